"""Free ports for a mesh: every port of one set is distinct.

Found in CI: `llmmesh up --free-ports` gave infer and Triton's metrics endpoint the same port (each was
picked by binding port 0 and closing the socket, and the kernel handed the freed port out again), so Triton
could not start and the mesh never became SERVING.
"""

from __future__ import annotations

import dataclasses

from llmmesh.launcher import MeshPorts, free_ports


def test_many_free_ports_at_once_are_all_distinct() -> None:
    """500 ports picked one by one repeat one with ~99 % probability (birthday bound over the ephemeral
    range); picked while all are held, never."""
    ports = free_ports(500)
    assert len(ports) == 500 and len(set(ports)) == 500


def test_a_free_mesh_port_set_has_no_duplicates() -> None:
    for _ in range(50):
        ports = dataclasses.astuple(MeshPorts.free())
        assert len(set(ports)) == len(ports)
