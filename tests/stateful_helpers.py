"""The model of test_stateful.py's machine (Note [Stateful model] there): groups of tensors
viewing one random storage, the record of a live handle, and the Hypothesis menus of dtypes and
shapes the groups are drawn from."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

import aqua_offload as aq
from helpers import align
from helpers import bits as tensor_bytes
from helpers import storage_bits as storage_bytes

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool,
          torch.complex64, torch.int16, torch.float64]
if hasattr(torch, "float8_e4m3fn"):
    DTYPES.append(torch.float8_e4m3fn)


def esize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def random_storage(nbytes: int, seed: int, dtype: torch.dtype,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Random bytes on ``device``; for bool, random 0/1 so every byte is a valid bool."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw &= 1
    return raw.to(device)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two byte tensors (tensor_bytes/storage_bytes: on the CPU) are equal."""
    return a.shape == b.shape and torch.equal(a, b)


class Group:
    """A storage and the tensors viewing it (Note [Stateful model], test_stateful.py)."""

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], front: int, back: int,
                 seed: int, *, device: torch.device) -> None:
        es = esize(dtype)
        n = math.prod(shape)
        raw = random_storage((front + n + back) * es, seed, dtype, device)
        base = raw[front * es:(front + n) * es].view(dtype).reshape(shape)
        self.dtype = dtype
        self.views = [base, raw]
        flat = base.view(-1)
        self.views += [flat[::3], flat[:0]]
        if base.dim() >= 1 and base.shape[0] > 1:
            self.views.append(base[1:])
        if base.dim() >= 2:
            self.views += [base.transpose(0, 1), base[:, 1::2]]
        if base.dim() >= 3:
            self.views.append(base.permute(2, 0, 1)[..., ::2])
        self.state = "resident"
        self.snap()

    def snap(self) -> None:
        """Record the reference bytes of the storage and of every view (resident only)."""
        assert self.state == "resident"
        self.storage_ref = storage_bytes(self.views[0])
        self.view_refs = [tensor_bytes(v) for v in self.views]

    def nbytes(self) -> int:
        return self.views[0].untyped_storage().nbytes()

    def check_intact(self) -> None:
        assert self.state == "resident"
        for v in self.views:
            assert not aq.is_offloaded(v)
        assert same_bytes(storage_bytes(self.views[0]), self.storage_ref)
        for v, ref in zip(self.views, self.view_refs):
            assert same_bytes(tensor_bytes(v), ref)

    def check_paged_out(self) -> None:
        # Metadata only: reading the data of a paged-out tensor would crash.
        for v in self.views:
            assert aq.is_offloaded(v)
            assert v.untyped_storage().nbytes() == 0


class Rec:
    """A live handle in the model."""

    def __init__(self, handle: aq.Handle, *, tensor: torch.Tensor, group: Group | None,
                 ref: torch.Tensor | None) -> None:
        self.handle = handle
        self.tensor = tensor  # release: the object fetch must return
        self.group = group    # release: the group paged out
        self.ref = ref        # snapshot: the bytes fetch must return; kept: the bytes held
        self.loc = handle.location  # where the model last saw it
        self.block = align(handle.nbytes)  # bytes of its pool block (0: none)
        self.kept = False        # a release fetched with keep=True: only base= or free
        self.prefetched = False  # a prefetch of it was started and not yet fetched


# Hypothesis favours small integers; sizes drawn from fixed menus reach full pools too.
_dim = st.sampled_from([1, 2, 3, 5, 8, 13, 0, 31, 64, 100])
group_specs = st.tuples(
    st.sampled_from(DTYPES),
    st.one_of(
        st.lists(_dim, min_size=0, max_size=3).map(tuple),
        st.tuples(st.sampled_from([700, 1500, 2500, 3999, 1]), st.sampled_from([1, 2, 3])),
    ),
    st.integers(0, 5),
    st.integers(0, 5),
    st.integers(0, 2**31 - 1),
)
