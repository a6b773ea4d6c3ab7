"""Sparse top-32 fwd+bwd at 2048 x 32000 on the CPU kernel, with the gradient buffer as torch
allocates it (plain) or madvise(MADV_HUGEPAGE)d before the kernel writes it (huge); steps run
back to back (gap 0) or with a pause between them. Prints each step's ms."""
import ctypes, mmap, statistics, sys, time
import torch, fastkd
from fastkd.kernels import kd_sparse_cpu

dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[1]]
huge, gap, steps = sys.argv[2] == "huge", float(sys.argv[3]), int(sys.argv[4])
madvise = ctypes.CDLL(None).madvise
madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
set_rows = kd_sparse_cpu.set_rows

def advised_set_rows(call, prefix, tensor):
    if huge and prefix == "grad":
        start = -(-tensor.data_ptr() // (2 << 20)) * (2 << 20)
        end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // (2 << 20) * (2 << 20)
        madvise(start, end - start, mmap.MADV_HUGEPAGE)
    return set_rows(call, prefix, tensor)
kd_sparse_cpu.set_rows = advised_set_rows

torch.manual_seed(0)
N, V, K = 2048, 32000, 32
teacher = 2 * torch.randn(N, V)
top = teacher.topk(K)
target = fastkd.TopKLogits(top.values.to(dtype), top.indices.to(torch.int32), teacher.logsumexp(-1), 1.0)
student = (2 * torch.randn(N, V)).to(dtype).requires_grad_()
labels = torch.randint(0, V, (N,))
times = []
for step in range(steps):
    time.sleep(gap)
    start = time.perf_counter()
    fastkd.kd_loss(student, target, labels, soft_weight=0.5, hard_weight=0.5).backward()
    times.append((time.perf_counter() - start) * 1e3)
    student.grad = None
print(sys.argv[1:], "steps ms:", " ".join(f"{t:.0f}" for t in times),
      f"| median of steps 4+: {statistics.median(times[3:]):.1f}")
