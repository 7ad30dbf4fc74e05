"""What a quantized model keeps resident: tensors out of file mappings, capture leftovers collected."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import fxquant
from fxquant.resources import copy_out_of_file_mappings, file_mapped_ranges

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")


def in_file_mapping(t: torch.Tensor) -> bool:
    address = t.untyped_storage().data_ptr()
    return any(start <= address < end for start, end in file_mapped_ranges())


def mappings_of(suffix: str) -> int:
    """How many address ranges of this process map a file whose path ends with `suffix`."""
    return sum(1 for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(suffix))


def resident_kb_of(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):  # a mapping's header line: range perms offset dev inode [path]
            inside = fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def test_copy_out_keeps_values_identity_and_ties(tmp_path):
    rows, cols = 256, 256  # 256 KiB per tensor: many whole pages
    values = torch.randn(3 * rows * cols)
    path = tmp_path / "weights.bin"
    with open(path, "wb") as f:
        f.write(values.numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())  # clean pages, as a checkpoint on disk has: reclaim skips dirty ones
    mapped = torch.from_file(str(path), shared=False, size=values.numel())  # a private mapping of the file
    assert in_file_mapping(mapped)
    shared = torch.nn.Parameter(mapped[: rows * cols].view(rows, cols))
    first, second = torch.nn.Linear(cols, rows), torch.nn.Linear(cols, rows)
    first.weight = second.weight = shared  # tied: one Parameter in two modules
    first.register_buffer("table", mapped[rows * cols: 2 * rows * cols].view(rows, cols))
    second.register_buffer("table", mapped[rows * cols: 2 * rows * cols].view(rows, cols))  # another tensor, same view
    model = torch.nn.Sequential(first, second)
    own_bias = first.bias
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert resident_kb_of(path) >= 2 * rows * cols * 4 // 1024  # the clones above read every page

    copied = copy_out_of_file_mappings([*model.parameters(), *model.buffers()])

    assert copied == 2 * rows * cols * 4  # the weight once and the table once; the biases were never mapped
    assert resident_kb_of(path) < rows * cols * 4 // 1024  # the pages the copies read were handed back
    assert first.weight is shared and second.weight is shared and first.bias is own_bias
    assert first.table.data_ptr() == second.table.data_ptr()
    assert not any(in_file_mapping(t) for t in [*model.parameters(), *model.buffers()])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert copy_out_of_file_mappings([*model.parameters(), *model.buffers()]) == 0


@pytest.mark.slow
def test_quantized_llm_lets_its_checkpoint_mapping_go():
    from fxquant.real_models import load_smollm2

    baseline = mappings_of("model.safetensors")  # other fixtures' models may map the same file
    model, tok = load_smollm2()
    assert mappings_of("model.safetensors") > baseline  # transformers maps the checkpoint
    assert in_file_mapping(model.model.embed_tokens.weight)
    prompt = tok("The GNU General Public License", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(input_ids=prompt).logits
    q = fxquant.quantize(model, scheme="w8a8_dynamic", example_inputs=[prompt], progress=False, inplace=True)
    # the float embedding (and tied head) that stays float no longer pins the mapping of the replaced weights
    assert not any(in_file_mapping(t) for t in [*q.parameters(), *q.buffers()])
    assert mappings_of("model.safetensors") == baseline
    with torch.no_grad():
        out = q(input_ids=prompt).logits
    assert float((out.argmax(-1) == ref.argmax(-1)).float().mean()) > 0.8


def test_unmap_pass_copies_only_what_stays_float(tmp_path):
    from fxquant.passes import ResolveSchemes, functional_to_modules, unmap_kept_tensors

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flat = torch.cat([t.flatten() for t in state.values()])
    path = tmp_path / "model.bin"
    path.write_bytes(flat.numpy().tobytes())
    mapped = torch.from_file(str(path), shared=False, size=flat.numel())
    offset = 0
    for p in model.parameters():  # every tensor of the model now views the file, as after mmap loading
        p.data = mapped[offset: offset + p.numel()].view_as(p)
        offset += p.numel()
    assert all(in_file_mapping(t) for t in model.state_dict().values())
    gm = fxquant.capture(model, (torch.randn(2, 64),))
    gm = unmap_kept_tensors(ResolveSchemes(default="w8a8_dynamic", disable_names=["2"])(functional_to_modules(gm)))
    still_mapped = sorted(k for k, t in gm.state_dict().items() if in_file_mapping(t))
    assert still_mapped == ["0.weight"]  # the quantized layer's float weight goes at freeze: no copy for it
    for name, t in gm.state_dict().items():
        assert torch.equal(t, state[name]), name


def _file_backed(model: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Make every parameter of `model` view one private mapping of `path` (as after mmap loading),
    its pages clean and resident; returns the values."""
    state = {k: v.detach().clone() for k, v in model.named_parameters()}
    with open(path, "wb") as f:
        f.write(torch.cat([t.flatten() for t in state.values()]).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())  # clean pages, as a checkpoint on disk has
    mapped = torch.from_file(str(path), shared=False, size=sum(t.numel() for t in state.values()))
    offset = 0
    for p in model.parameters():
        p.data = mapped[offset: offset + p.numel()].view_as(p)
        offset += p.numel()
    assert all(in_file_mapping(p) for p in model.parameters())
    assert all(torch.equal(p, state[k]) for k, p in model.named_parameters())  # read: every page resident
    return state


def test_page_out_hands_back_file_pages_and_keeps_values(tmp_path):
    from fxquant.resources import page_out_file_pages

    lin = torch.nn.Linear(512, 512)
    path = tmp_path / "w.bin"
    state = _file_backed(lin, path)
    assert resident_kb_of(path) >= 1024
    ranges = file_mapped_ranges()
    assert page_out_file_pages(lin.weight, ranges)
    assert resident_kb_of(path) < 64  # the weight's 1 MB went; the bias's pages may stay
    assert torch.equal(lin.weight, state["weight"])  # read again from the file
    assert not page_out_file_pages(torch.randn(512, 512), ranges)  # anonymous memory: left alone
    with torch.no_grad():
        lin.weight.mul_(2.0)  # written: the mapping's pages become private copies
    assert resident_kb_of(path) >= 1024
    assert not page_out_file_pages(lin.weight, ranges)  # paging them out would only swap them
    assert resident_kb_of(path) >= 1024 and torch.equal(lin.weight, 2.0 * state["weight"])


def test_layerwise_calibration_hands_back_each_finished_layers_file_pages(tmp_path):
    from fxquant import CalibrationRunner
    from fxquant.keep_acc import GPTQWeights
    from fxquant.passes import InsertQuantOprs, PassManager, ResolveSchemes, functional_to_modules

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256)).eval()
    data = [[torch.randn(64, 256)] for _ in range(4)]
    gm = fxquant.capture(model, (data[0][0],))
    gm = PassManager([functional_to_modules, ResolveSchemes(default="w8a16", disable_last_layer=False),
                      InsertQuantOprs()])(gm)
    path = tmp_path / "model.bin"
    state = _file_backed(gm, path)
    assert resident_kb_of(path) >= 2 * 256 * 512 * 4 // 1024
    CalibrationRunner(gm, data, weight_optimizers=[GPTQWeights()]).layerwise_calibration(progress=False)
    assert resident_kb_of(path) < 128  # of 1 MB: both float weights were read for the last time and handed back
    for k, p in gm.named_parameters():
        assert torch.equal(p, state[k]), k


def test_freeze_hands_back_the_file_pages_of_the_float_weights_it_releases(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256)).eval()
    x = torch.randn(8, 256)
    with torch.no_grad():
        ref = model(x)
    path = tmp_path / "model.bin"
    _file_backed(model, path)
    assert resident_kb_of(path) >= 2 * 256 * 512 * 4 // 1024
    q = fxquant.quantize(model, scheme="w8a16", example_inputs=[x], disable_last_layer=False, progress=False)
    assert resident_kb_of(path) < 128  # of 1 MB: quantizing read both weights, freezing handed them back
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # the user's float model rereads its weights from the file
        assert torch.allclose(q(x), ref, atol=0.05, rtol=0.05)
