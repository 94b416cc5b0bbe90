"""Leaving a torchrun job's process group without a teardown crash."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist


def finish(code: int) -> int:
    """End a successful distributed job with exit status ``code``.

    Call after the ranks have met at a final barrier with every output written. gloo (the CPU
    backend) can abort a rank with SIGABRT during teardown when its peer has already closed its
    sockets: the error is raised on a gloo background thread, so Python cannot catch it, and the
    job fails after it has finished (seen about 1 run in 10 on a loaded 2-core machine). On gloo
    the process therefore exits without that teardown; NCCL's group is destroyed normally.
    """
    if not dist.is_initialized():
        return code
    if dist.get_backend() == "gloo":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    dist.destroy_process_group()
    return code
