"""Row tables: the Triton kernel (interpreted on CPU) copies exactly the bytes of each row."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.eplb import row_copy
from elastic_ep.eplb.row_copy import RowTable
from tests.procs import run_ranks

DTYPES = [torch.uint8, torch.int16, torch.bfloat16, torch.float32, torch.float64]


@pytest.fixture(scope="module")
def interpreted() -> object:
    """The module's kernel run by Triton's CPU interpreter (skipped without triton)."""
    pytest.importorskip("triton")
    from tests.triton_interpreter import interpreted_row_copy_kernel

    return interpreted_row_copy_kernel()


@st.composite
def row_sets(draw: st.DrawFn) -> tuple[list[torch.Tensor], list[tuple[int, int, int, int]]]:
    """Tensors ``[slots, n]`` of mixed dtypes, and rows (src tensor, src slot, dst tensor, dst
    slot) between tensors of the same row size, every destination slot written at most once and
    never read by another row (one launch's contract)."""
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for _ in range(draw(st.integers(2, 5))):
        dtype = draw(st.sampled_from(DTYPES))
        slots, width = draw(st.integers(1, 6)), draw(st.integers(1, 40))
        raw = torch.randint(
            0, 256, (slots * width * dtype.itemsize,), dtype=torch.uint8, generator=gen
        )
        tensors.append(raw.view(dtype).view(slots, width))
    # A byte offset into a larger tensor makes addresses unaligned to 4 or 16 bytes.
    shift = draw(st.integers(0, 5))
    host = torch.randint(0, 256, (shift + 64,), dtype=torch.uint8, generator=gen)
    tensors.append(host[shift : shift + 64].view(4, 16))
    cells = [(t, s) for t in range(len(tensors)) for s in range(tensors[t].shape[0])]
    order = draw(st.permutations(cells))
    half = len(order) // 2
    sources, targets = order[:half], order[half:]
    rows = []
    for t, s in targets:
        nbytes = tensors[t][s].numel() * tensors[t].element_size()
        same = [
            c
            for c in sources
            if tensors[c[0]][c[1]].numel() * tensors[c[0]].element_size() == nbytes
        ]
        if same:
            src = draw(st.sampled_from(same))
            rows.append((src[0], src[1], t, s))
    return tensors, rows


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _run(
    tensors: list[torch.Tensor], rows: list[tuple[int, int, int, int]], kernel: object | None
) -> list[torch.Tensor]:
    out = [t.clone() for t in tensors]
    anchor = torch.zeros(256, dtype=torch.uint8)
    table = RowTable(anchor)
    pairs = [(out[a][i], out[b][j]) for a, i, b, j in rows]
    launch = table.add_pairs(pairs)
    table.upload()
    if kernel is None:  # the reference: one byte copy per row, in order
        for src, dst in pairs:
            _bytes(dst).copy_(_bytes(src))
    else:
        table.copy(launch, kernel)
    return out


@settings(max_examples=40, deadline=None)
@given(row_sets())
def test_triton_matches_torch(
    interpreted: object, case: tuple[list[torch.Tensor], list[tuple[int, int, int, int]]]
) -> None:
    tensors, rows = case
    want = _run(tensors, rows, None)
    got = _run(tensors, rows, interpreted)
    for w, g in zip(want, got, strict=True):
        assert torch.equal(_bytes(w), _bytes(g))


@settings(max_examples=40, deadline=None)
@given(row_sets())
def test_reference_copies_each_row(
    case: tuple[list[torch.Tensor], list[tuple[int, int, int, int]]],
) -> None:
    tensors, rows = case
    got = _run(tensors, rows, None)
    written = {(b, j) for _, _, b, j in rows}
    for a, i, b, j in rows:
        assert torch.equal(_bytes(got[b][j]), _bytes(tensors[a][i]))
    for t, tensor in enumerate(tensors):
        for s in range(tensor.shape[0]):
            if (t, s) not in written:
                assert torch.equal(_bytes(got[t][s]), _bytes(tensor[s]))


def test_word_size_follows_alignment() -> None:
    anchor = torch.zeros(64, dtype=torch.uint8)
    table = RowTable(anchor)
    a = torch.zeros(4, 16, dtype=torch.float32)
    assert (table.add_pairs([(a[0], a[1])]).word, table.add_pairs([(a[0], a[1])]).align) == (4, 4)
    assert table.add_pairs([(anchor[4:12], anchor[20:28])]).align == 1
    assert table.add_pairs([(anchor[1:3], anchor[8:10])]).word == 1
    assert table.add([]).count == 0
    table.copy(table.add([]))  # nothing to launch, no table needed


@pytest.mark.parametrize("programs", [1, 2, 3, 7, 31, 1000])
def test_every_block_is_copied_whatever_the_programs(
    interpreted: object, monkeypatch: pytest.MonkeyPatch, programs: int
) -> None:
    """Rows of 203, 37, 8 and 1 words in blocks of 8 (26 + 5 + 1 + 1 blocks): each program
    strides over the blocks numbered across the rows, fewer or more programs than blocks."""
    monkeypatch.setattr(row_copy, "BLOCK", 8)
    lengths = [203, 37, 8, 1]
    src = [torch.arange(n, dtype=torch.int32) + 1000 * i for i, n in enumerate(lengths)]
    dst = [torch.zeros(n, dtype=torch.int32) for n in lengths]
    table = RowTable(torch.zeros(16, dtype=torch.uint8))
    launch = table.add_pairs(list(zip(src, dst, strict=True)))
    assert launch.blocks == 33
    table.upload()
    assert table.table is not None and table.table[3].tolist() == [0, 26, 31, 32]
    table.copy(launch, interpreted, programs=programs)
    assert all(torch.equal(s, d) for s, d in zip(src, dst, strict=True))


def test_bad_rows_are_refused() -> None:
    with pytest.raises(ValueError, match="anchor"):
        RowTable(torch.zeros(6, dtype=torch.uint8))
    table = RowTable(torch.zeros(16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="sizes differ"):
        table.add_pairs([(torch.zeros(3), torch.zeros(4))])
    with pytest.raises(ValueError, match="contiguous"):
        table.add_pairs([(torch.zeros(4, 4)[:, 0], torch.zeros(4))])
    with pytest.raises(RuntimeError, match="upload"):
        table.copy(table.add_pairs([(torch.zeros(4), torch.zeros(4))]))


@pytest.mark.parametrize(
    ("anchor", "align", "load"), [("*i32", 4, "ld.global.v4.b32"), ("*u8", 1, "ld.global.b8")]
)
def test_kernel_compiles_for_hopper(anchor: str, align: int, load: str) -> None:
    """The real compiler (no GPU needed): the kernel lowers to PTX for sm_90, with 128-bit
    loads when the launch is 16-byte aligned."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {
        "anchor": anchor,
        "src_ptr": "*i64",
        "dst_ptr": "*i64",
        "len_ptr": "*i64",
        "first_ptr": "*i64",
        "rows": "i32",
    }
    constexprs = {"BLOCK": row_copy.BLOCK, "ALIGN": align}
    source = ASTSource(
        fn=row_copy._copy_rows_kernel,
        signature={**signature, **dict.fromkeys(constexprs, "constexpr")},
        constexprs=constexprs,
        attrs={(0,): [["tt.divisibility", 16]]},
    )
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    except RuntimeError as err:  # no ptxas in this triton install
        pytest.skip(f"cannot compile for CUDA here: {err}")
    assert load in compiled.asm["ptx"]


def test_warm_up_is_a_no_op_without_cuda() -> None:
    row_copy.warm_up("cpu")  # the executor's CPU path needs no kernel


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_warm_up_launches_the_kernel_and_checks_its_copy() -> None:
    pytest.importorskip("triton")
    row_copy.warm_up(torch.device("cuda", 0))  # raises if the copied bytes are wrong
    # the executor's next launch of the same variant copies correctly too
    src = torch.arange(64, dtype=torch.float32, device="cuda").view(4, 16)
    dst = torch.zeros_like(src)
    table = RowTable(torch.empty(64, dtype=torch.uint8, device="cuda"))
    rows = table.add_pairs([(src[i], dst[3 - i]) for i in range(4)])
    table.upload()
    table.copy(rows)
    assert torch.equal(dst, src.flip(0))


def test_warm_up_rejects_an_unknown_path() -> None:
    with pytest.raises(ValueError, match="path must be 'triton' or 'torch'"):
        row_copy.warm_up("cpu", "engine")


def test_torch_copy_rows_copies_exactly_the_rows() -> None:
    flat = [torch.arange(32, dtype=torch.uint8), torch.zeros(16, dtype=torch.uint8)]
    as_array = functools.partial(np.array, dtype=np.int64)
    row_copy.torch_copy_rows(
        flat,
        as_array([0, 0]),
        as_array([3, 20]),
        as_array([1, 1]),
        as_array([0, 9]),
        as_array([5, 4]),
    )
    expected = torch.zeros(16, dtype=torch.uint8)
    expected[:5], expected[9:13] = torch.arange(3, 8), torch.arange(20, 24)
    assert torch.equal(flat[1], expected)


def _first_copy_beside_a_busy_stream(
    rank: int, world_size: int, port: int, path: str, warm: bool
) -> bool:
    """In a fresh process: keep the GPU busy for ~1 s on one stream, then launch the copy
    ``path`` runs (as ``execute`` would, mid-run) on another. Returns whether that launch
    waited for the busy stream, and checks its bytes."""
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    side, copying = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
    with torch.cuda.stream(side):
        torch.cuda._sleep(1000)  # loads the sleep kernel
    source = torch.arange(64, dtype=torch.uint8, device=dev)
    target = torch.zeros(64, dtype=torch.uint8, device=dev)
    copies = [(4, 8, 16), (30, 40, 8)]  # (source offset, target offset, bytes): a multi-tensor copy
    table = RowTable(source)
    rows = table.add([(source.data_ptr() + a, target.data_ptr() + b, n) for a, b, n in copies])
    table.upload()
    torch.cuda.synchronize()
    if warm:
        row_copy.ensure_warm(dev, path)
    with torch.cuda.stream(side):
        torch.cuda._sleep(int(2e9))  # about a second at 2 GHz
        busy = torch.cuda.Event()
        busy.record()
    with torch.cuda.stream(copying):
        if path == "torch":
            src, dst, nbytes = np.array(copies, dtype=np.int64).T
            row_copy.torch_copy_rows([source, target], src * 0, src, dst * 0 + 1, dst, nbytes)
        else:
            table.copy(rows)
    waited = busy.query()
    torch.cuda.synchronize()
    expected = torch.zeros_like(target)
    for a, b, n in copies:
        expected[b : b + n] = source[a : a + n]
    assert torch.equal(target, expected)
    return waited


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("path", ["triton", "torch"])
def test_a_warmed_copy_path_does_not_wait_for_a_busy_device(path: str) -> None:
    """CUDA loads a kernel at its first launch once the device is idle: mid-run, behind
    transfers a dead peer never completes, that is a wait without a bound. After
    ``ensure_warm(device, path)`` the path's launches must not wait."""
    if path == "triton":
        pytest.importorskip("triton")
    (cold,) = run_ranks(_first_copy_beside_a_busy_stream, 1, path, False, timeout=120)
    if not cold:
        pytest.skip("this CUDA loads kernels eagerly: a cold launch did not wait either")
    (warmed,) = run_ranks(_first_copy_beside_a_busy_stream, 1, path, True, timeout=120)
    assert not warmed


def test_kernel_variants_do_not_depend_on_slice_or_loop_counts() -> None:
    """Triton compiles one variant per specialization key; the key must not change with where
    a launch's slice starts in the table or with its row count (1 or not), or a process's
    first launch of a new key pays a compile that ``warm_up`` did not do."""
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = row_copy._copy_rows_kernel
    binder = create_function_from_signature(
        kernel.signature, kernel.params, make_backend(GPUTarget("cuda", 90, 32))
    )
    anchor = torch.zeros(64, dtype=torch.int32)
    table = torch.zeros(4, 16, dtype=torch.int64)
    keys = {
        repr(binder(anchor, *table[:, start:], rows, BLOCK=4096, ALIGN=4)[1])
        for rows, start in [(1, 0), (52, 3), (1, 5), (7, 0)]
    }
    assert len(keys) == 1
