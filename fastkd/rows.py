"""``(..., V)`` tensors as the rows the loss backends read: ``(N, V)`` or ``(B, S, V)`` views of
the caller's memory, so that e.g. ``logits[:, :-1]`` (next-token alignment) is never copied."""
import torch

__all__ = ["row_views"]


def _merged_leading_dims(shape, *strides):
    """Merge adjacent leading dims that collapse into one strided dim in every tensor; returns
    the merged sizes (dims of size 1 dropped)."""
    sizes, inner_strides = [], []
    for dim, size in enumerate(shape):
        if size == 1:
            continue
        dim_strides = [stride[dim] for stride in strides]
        if sizes and all(outer == size * inner for outer, inner in zip(inner_strides, dim_strides)):
            sizes[-1] *= size
        else:
            sizes.append(size)
        inner_strides = dim_strides
    return sizes


def row_views(*tensors: torch.Tensor):
    """Tensors of one shape ``(..., V)`` as ``(N, V)`` or ``(B, S, V)`` views of the same memory
    (no copy) when the last dim has stride 1 and the leading dims merge into at most two strided
    dims in every tensor; otherwise copies (rare: a transposed last dim, or three separately
    sliced leading dims)."""
    num_classes = tensors[0].shape[-1]
    tensors = [tensor.contiguous() if tensor.stride(-1) != 1 and num_classes > 1 else tensor
               for tensor in tensors]
    if tensors[0].dim() == 2:
        return tuple(tensors)
    sizes = _merged_leading_dims(tensors[0].shape[:-1],
                                 *(tensor.stride()[:-1] for tensor in tensors))
    if len(sizes) == 2 and tensors[0].numel():
        return tuple(tensor.view(sizes[0], sizes[1], num_classes) for tensor in tensors)
    return tuple(tensor.reshape(-1, num_classes) for tensor in tensors)
