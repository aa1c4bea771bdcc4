"""cuBLAS workspaces around CUDA graph captures.

cuBLAS keeps one workspace per (handle, stream) for the life of the process, and every capture in torch runs
on the same default capture stream. A capture that finds that stream's workspace already made uses it, so its
graph points into memory it does not own: memory that belonged to an earlier, possibly freed, graph's pool or
that a later clear returns to the allocator. Replaying it then reads freed memory (an illegal memory access
once that pool's segment is gone: training graphs captured after a decoding graph had been freed did this).
Clearing before the capture makes it allocate its own workspace inside its graph's pool; clearing after
keeps the process from holding a workspace per stream it has seen."""

from __future__ import annotations

import contextlib

import torch


def clear_cublas_workspaces() -> None:
    """Drops cuBLAS's per-stream workspaces; the next matmul on a stream allocates its own again. A graph
    captured inside :func:`own_cublas_workspace` keeps its workspace in its own pool, alive as long as it is."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


@contextlib.contextmanager
def own_cublas_workspace():
    """Wrap a CUDA graph capture so that the graph's cuBLAS workspace is made inside it (in the graph's
    memory pool) and nobody else keeps it afterwards; torch's compiled graph trees do the same."""
    clear_cublas_workspaces()
    try:
        yield
    finally:
        clear_cublas_workspaces()
