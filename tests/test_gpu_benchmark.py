"""benchmarks/gpu.py: its FLOP count against the published figure, and its smoke mode on the CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from dinocli import create_backbone

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_vit_small_forward_flops_are_the_published_4_6_gmacs():
    gpu = load_script()
    flops = gpu.backbone_flops(create_backbone("vit_small", patch_size=16), 224)
    assert flops == pytest.approx(2 * 4.6e9, rel=0.02)  # DeiT-S / ViT-S/16 at 224 px: 4.6 GMACs


def test_quick_run_on_the_cpu_measures_every_row(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    load_script().main(["--device", "cpu", "--quick", "--json", str(out)])
    assert "dinocli GPU benchmark" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["complete"] is True
    rows = saved["rows"]
    names = [r["what"] for r in rows]
    assert any(n.startswith("train step") for n in names)
    assert sum("train end to end" in n for n in names) == 3
    assert all(0 <= r["data_wait_share"] <= 1 for r in rows if "train end to end" in r["what"])
    assert sum(n.startswith("extract_features from JPEG") for n in names) == 2
    assert any(n.startswith("k-NN") for n in names)
    assert not any("vision#9606" in n for n in names)  # a CUDA-only row
    for r in rows:
        if "images_per_s" in r:
            assert r["images_per_s"] > 0 and r["flops_per_image"] > 0 and r["mfu"] is None  # no peak on a CPU
    knn = next(r for r in rows if r["what"].startswith("k-NN"))
    assert knn["backend"] == "faiss-cpu" and knn["top1_k20"] > 50  # well separated clusters
    split = next(r for r in rows if "--augment-on split vs cpu" in r["what"])
    assert split["max_relative_difference"] == 0  # the same views, coloured elsewhere
    same = next(r for r in rows if "--augment-on gpu vs cpu" in r["what"])
    assert len(same["losses"]) == len(same["reference_losses"]) == 2  # the timed end-to-end steps
    assert 0 <= same["max_relative_difference"] < 4e-3  # the views differ by the resize's rounding only
    train = next(r for r in rows if r["what"].startswith("train step"))
    assert len(train["losses"]) == 3 and train["host_syncs_per_step"] is None  # warm-up + timed; no CUDA
    assert train["loss"] == pytest.approx(train["loss"]) and 0 < train["loss"] < 20  # finite, about log(K)
    profile = next(r for r in rows if r["what"].startswith("where the time of that step goes"))
    assert names.index(profile["what"]) == names.index(train["what"]) + 1
    assert sum(profile["kinds"].values()) == pytest.approx(1.0) and profile["kinds"]["matrix products"] > 0.1
    assert 0 < profile["busy_ms_per_step"] and profile["kernels_per_step"] is None and profile["ops_per_step"] > 100
    assert profile["result"].startswith("CPU in ATen operations")
    residual = next(r for r in rows if r["what"].startswith("stochastic-depth residual"))
    assert residual["shape"] == [8, 5, 192] and residual["fused_ms"] > 0 and residual["three_ops_ms"] > 0
    host = next(r for r in rows if r["what"].startswith("--augment-on gpu work of the training process"))
    split_host = next(r for r in rows if r["what"].startswith("--augment-on split work of the training process"))
    assert 0 < split_host["ops"] < host["ops"]  # colour only, not decoding and cropping too
    assert 0 < host["host_ms"] <= host["done_ms"] and host["ops"] > 0 and host["batch"] == 4


def test_a_failed_measurement_is_a_row_and_the_json_keeps_what_a_run_cut_short_measured(tmp_path, monkeypatch,
                                                                                      capsys):
    gpu = load_script()

    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    for name in ("bench_training", "bench_end_to_end", "bench_extract"):
        monkeypatch.setattr(gpu, name, boom)
    monkeypatch.setattr(gpu, "bench_knn", interrupted)  # the last measurement: the run is cut short there
    out = tmp_path / "gpu.json"
    with pytest.raises(KeyboardInterrupt):
        gpu.main(["--device", "cpu", "--quick", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["complete"] is False
    failed = [r for r in saved["rows"] if r["result"].startswith("failed")]
    assert [r["what"].split(" ")[0] for r in failed] == ["train"] * 4 + ["extract"]  # step, 3 end-to-end
    for r in failed:
        assert r["result"] == "failed: RuntimeError: boom"
        assert "Traceback" in r["traceback"] and "second line" in r["traceback"]
    host = next(r for r in saved["rows"] if r["what"].startswith("--augment-on gpu work"))
    assert host["ops"] > 0  # measured between the failures
    assert not any(r["what"].startswith(("k-NN", "losses of")) for r in saved["rows"])
    assert "train step vit_tiny/16" in capsys.readouterr().out  # each row printed as it is measured


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matrix products"),
    ("ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x3_tn", "matrix products"),
    ("aten::addmm", "matrix products"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<TensorListMetadata<4>>",
     "foreach updates (optimiser, EMA, clipping)"),
    ("aten::_fused_adamw_", "foreach updates (optimiser, EMA, clipping)"),
    ("Memcpy HtoD (Pinned -> Device)", "copies"),
    ("triton_per_fused_native_layer_norm_0", "other"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "other"),
])
def test_kernels_and_operations_are_sorted_into_kinds(name, kind):
    assert load_script().kind_of(name) == kind


def test_op_counter_counts_the_aten_operations_run_inside_it():
    import torch

    with load_script().OpCounter() as ops:
        x = torch.ones(3)
        (x + 1).mul_(2).sum()
    assert ops.count == 4  # ones, add, mul_, sum


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device in this environment")
def test_decoding_on_cuda_never_overwrites_memory_queued_kernels_read(tmp_path):
    """pytorch/vision#9606: nvJPEG may write into blocks freed with reads still queued; dinocli's
    decode takes its memory elsewhere (the check itself is in benchmarks/gpu.py)."""
    from dinocli.augmentations.device import decode

    gpu = load_script()
    files = gpu.write_jpegs(tmp_path / "jpeg", 8, (500, 375), 1)
    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in sorted(files.iterdir())]
    device = torch.device("cuda")
    assert gpu.decode_overwrites(lambda d: decode(d, device), data, device, iterations=20) == 0
