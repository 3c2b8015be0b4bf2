"""Tests of the FX graph passes: detection, extension, in-place ops, scans, policy, the rewrite."""
