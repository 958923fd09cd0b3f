"""Fixtures shared by the component tests: a real sshd on loopback and loop devices (see sshd_fixture)."""

from sshd_fixture import loop_devices, sshd

__all__ = ["loop_devices", "sshd"]
