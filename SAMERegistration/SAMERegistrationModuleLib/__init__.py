"""Helpers of the SAME Registration module: process runner, devices, logic, self-test."""
