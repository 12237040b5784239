"""Device and precision (issue 26): ``[compute]`` is resolved in one place, every stage follows its model's
device, and frozen models may be bfloat16 while prompts, optimiser state, losses and DP arithmetic stay float32.

CI has no GPU. Device *selection* is tested with torch's availability checks mocked; the loaders' *wiring* with
the ``meta`` device, a real second device on any machine (a loader that ignored ``compute`` would leave its model
on the CPU); *precision* on the CPU, where bfloat16 runs. What only a GPU can show (the loops' tensors meeting on
the device, the speed) is for ``benchmarks/bench_device.py`` on the first GPU (docs/benchmarks.md#gpu).
"""

import json

import numpy as np
import pytest
import torch

from post_fl.core import compute as C
from post_fl.core.compute import Compute, DeviceError, misplaced, pass_rows, resolve_compute
from post_fl.core.config import ComputeConfig, ConfigError, RunConfig, config_from_dict

from conftest import make_sentiment

pytestmark = pytest.mark.usefixtures("one_thread")
LABELS, WORDS = ["negative", "positive"], {"positive": ["good"], "negative": ["bad"]}
CPU, META = torch.device("cpu"), torch.device("meta")
BF16 = Compute(CPU, torch.bfloat16)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(C, "mps_available", lambda: False)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Make torch report ``count`` CUDA devices (bfloat16 support as given), as a GPU machine's torch would."""
    def make(count: int = 1, bf16: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    return make


def _settings(tiny_dirs, files, kind="causal") -> dict:
    train, test, public = files
    return {"model.teacher": tiny_dirs[kind], "data.train": str(train), "data.test": str(test),
            "data.public": str(public), "distill.steps": 3, "distill.batch_size": 8, "tune.epochs": 1,
            "tune.batch_size": 8, "tune.target_epsilon": 4, "transfer.steps": 3, "prompt.num_virtual_tokens": 2}


# ---------------------------------------------------------------- selection
def test_auto_is_the_cpu_in_float32_without_a_gpu(no_gpu):
    assert resolve_compute(RunConfig().compute) == Compute(CPU, torch.float32, 0)
    assert resolve_compute(ComputeConfig(dtype="bfloat16")).dtype == torch.bfloat16  # asked for: allowed on a CPU


def test_auto_takes_cuda_then_mps_and_bfloat16_where_the_gpu_has_it(monkeypatch, fake_cuda):
    fake_cuda(count=2)
    assert resolve_compute() == Compute(torch.device("cuda", 0), torch.bfloat16)
    assert resolve_compute(ComputeConfig(device="cuda:1", dtype="float32")).device == torch.device("cuda", 1)
    fake_cuda(count=1, bf16=False)  # e.g. a V100 or T4
    assert resolve_compute().dtype == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(C, "mps_available", lambda: True)
    assert resolve_compute() == Compute(torch.device("mps"), torch.float32)


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "mps"])
def test_a_device_that_is_not_here_is_refused_naming_the_setting(no_gpu, spec):
    with pytest.raises(DeviceError, match=f"compute.device = '{spec}'"):
        resolve_compute(ComputeConfig(device=spec))


def test_a_gpu_index_beyond_the_machine_and_bfloat16_without_support_are_refused(fake_cuda):
    fake_cuda(count=1, bf16=False)
    with pytest.raises(DeviceError, match=r"compute.device = 'cuda:3': this machine has 1 CUDA device"):
        resolve_compute(ComputeConfig(device="cuda:3"))
    with pytest.raises(DeviceError, match="compute.dtype = 'bfloat16': Fake GPU"):
        resolve_compute(ComputeConfig(device="cuda", dtype="bfloat16"))


@pytest.mark.parametrize("key,value", [("device", "gpu"), ("device", "cuda:x"), ("dtype", "float16"),
                                       ("batch_size", -1)])
def test_compute_settings_are_validated_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"compute.{key}"):
        config_from_dict({"compute": {key: value}})


def test_preflight_refuses_a_missing_gpu_before_any_stage(no_gpu, tmp_path, tiny_dirs, files, capsys):
    from post_fl.cli import main

    run = tmp_path / "run"
    args = ["run", "--output-dir", str(run), "--quiet", "--set", 'compute.device="cuda"']
    for k, v in _settings(tiny_dirs, files).items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    assert main(args) == 2
    assert "compute.device = 'cuda'" in capsys.readouterr().err
    assert not run.exists()  # nothing was written: refused before any stage


# ---------------------------------------------------------------- one place, applied everywhere
def test_loaders_put_every_model_and_prompt_where_compute_says(monkeypatch, tmp_path, tiny_dirs, files):
    """The ``meta`` device stands in for a GPU: a loader or prompt maker that ignored ``compute`` would leave
    its tensors on the CPU, and ``misplaced`` would name them."""
    from post_fl.core import tasks
    from post_fl.core.config import load_config
    from post_fl.core.deep_prompt import DeepPrompt, new_prompt, prompt_with_weight
    from post_fl.core.prompt import save_prompt
    from post_fl.pipeline import Pipeline

    placed = Compute(META, torch.float32)
    monkeypatch.setattr(tasks, "resolve_compute", lambda cfg: placed)
    # an input prompt: making a deep one runs the model, which a meta model cannot (no values)
    cfg = load_config(None, {**_settings(tiny_dirs, files), "prompt.form": "input"})
    task = tasks.load_task(cfg)
    teacher = tasks.load_teacher(cfg, task)
    student = tasks.load_student(tiny_dirs["causal"], cfg, task, teacher)
    for model in (teacher, student):
        assert model.compute is placed and model.device == META
        assert misplaced(model.backbone.named_parameters(), META) == []
    assert new_prompt(teacher, cfg.prompt, 0).weight.device == META
    assert prompt_with_weight(np.zeros((2, teacher.embedding_dim), np.float32), teacher, cfg.prompt, 0).weight.device == META
    save_prompt(torch.zeros(2, teacher.embedding_dim), tmp_path / "run" / "prompt_student", head=teacher.head)
    assert Pipeline(cfg, tmp_path / "run").prompt("prompt_student", teacher).weight.device == META
    deep = DeepPrompt(torch.ones(3, 2, 4), torch.tensor([1.0, 2.0, 3.0])).to(META)
    assert deep.weight.device == META and deep.scales.device == META  # scales move with the weight


def test_misplaced_names_each_tensor_off_the_device_or_dtype():
    named = [("a", torch.zeros(2)), ("b", torch.zeros(2, device=META)), ("c", torch.zeros(2, dtype=torch.bfloat16)),
             ("ids", torch.zeros(2, dtype=torch.long))]
    assert misplaced(named, CPU) == ["b: meta, float32"]
    assert misplaced(named, CPU, torch.float32) == ["b: meta, float32", "c: cpu, bfloat16"]


def test_memory_bound_passes_grow_on_a_gpu_unless_set(tiny_dirs):
    from post_fl.core.models import load_scoring_model

    model = load_scoring_model(tiny_dirs["causal"], LABELS, WORDS)
    assert pass_rows(32, model) == 32  # the CPU: the stage's own setting
    model.compute = Compute(CPU, torch.float32, batch_size=8)
    assert pass_rows(32, model) == 8  # compute.batch_size wins everywhere
    model.compute = Compute(META, torch.float32)
    model.backbone.to(META)
    assert pass_rows(32, model) == C.GPU_PASS_ROWS and pass_rows(1000, model) == 1000


def test_dp_noise_generator_is_made_on_the_device_that_adds_the_noise(monkeypatch):
    """Opacus draws DP-SGD noise with ``torch.normal(device=<parameter's device>, generator=...)``: on a GPU the
    generator must live there. The sampler's stays on the CPU; both are OS-entropy seeded (no insecure seed)."""
    from post_fl.method import tuning

    made = []

    def fake(insecure_seed=None, *stream, device="cpu"):
        made.append((insecure_seed, stream, torch.device(device)))
        return torch.Generator()

    monkeypatch.setattr(tuning, "dp_torch_generator", fake)
    sampler, noise = tuning.dp_sgd_generators(None, CPU)
    assert sampler is noise and made == [(None, (tuning.DP_SGD_STREAM,), CPU)]
    made.clear()
    sampler, noise = tuning.dp_sgd_generators(None, torch.device("cuda", 0))
    assert sampler is not noise
    assert made == [(None, (tuning.DP_SGD_STREAM,), CPU),
                    (None, (tuning.DP_SGD_STREAM, tuning.NOISE_STREAM), torch.device("cuda", 0))]


def test_flower_virtual_clients_get_a_gpu_share_where_there_are_gpus(monkeypatch, fake_cuda):
    import flwr.simulation

    from simulation import run as sim

    for var in ("TOKENIZERS_PARALLELISM", "RAY_DEDUP_LOGS", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"):
        monkeypatch.setenv(var, "0")
    seen = {}
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kw: seen.update(kw["backend_config"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    sim.run_apps(None, None, 4, num_cpus=2)
    assert seen["client_resources"]["num_gpus"] == 0.0 and seen["init_args"]["num_gpus"] == 0
    fake_cuda(count=2)
    sim.run_apps(None, None, 4, num_cpus=2)
    assert seen["client_resources"]["num_gpus"] == sim.GPU_FRACTION and seen["init_args"]["num_gpus"] == 2
    sim.run_apps(None, None, 4, num_cpus=2, gpus_per_client=1.0)
    assert seen["client_resources"]["num_gpus"] == 1.0


# ---------------------------------------------------------------- precision
@pytest.mark.parametrize("kind", ["causal", "masked", "embedding"])
def test_a_bfloat16_model_predicts_as_float32_within_tolerance(tiny_dirs, kind):
    from post_fl.core.models import load_scoring_model
    from post_fl.method.evaluate import class_scores

    texts = make_sentiment(64, seed=1).texts
    full = load_scoring_model(tiny_dirs[kind], LABELS, WORDS)
    half = load_scoring_model(tiny_dirs[kind], LABELS, WORDS, compute=BF16)
    assert misplaced(half.backbone.named_parameters(), CPU, torch.bfloat16) == []
    s32, s16 = class_scores(full, texts), class_scores(half, texts)
    assert s16.dtype == torch.float32  # class scores are computed in float32 from bfloat16 weights
    assert half.answer_logits(half.encode(texts[:4])).dtype == torch.float32
    diff = float((s32 - s16).abs().max())
    assert 0 < diff <= 0.1 * float(s32.max() - s32.min())  # bfloat16 really ran, and stayed close
    margin = (s32[:, 1] - s32[:, 0]).abs()
    same = s32.argmax(-1) == s16.argmax(-1)
    assert bool((same | (margin <= 2 * diff)).all()) and float(same.float().mean()) >= 0.9


def test_bfloat16_frozen_models_keep_prompts_losses_and_dp_in_float32(tiny_dirs):
    """Each stage on a bfloat16 teacher/student: what it trains and hands on is float32 on the model's device."""
    from post_fl.core.config import DistillConfig, TransferConfig, TuneConfig
    from post_fl.core.models import load_scoring_model
    from post_fl.core.prompt import init_from_vocab
    from post_fl.federated.batched import train_clients_batched
    from post_fl.method.distill import distill_student
    from post_fl.method.transfer import transfer_prompt
    from post_fl.method.transfer_targets import compute_targets
    from post_fl.method.tuning import tune_prompt

    teacher = load_scoring_model(tiny_dirs["causal"], LABELS, WORDS, compute=BF16)
    data, public = make_sentiment(32, seed=4), make_sentiment(24, seed=5)
    student, report = distill_student(teacher, public, DistillConfig(num_layers=2, steps=2, batch_size=8,
                                                                     eval_every=1))
    assert report.steps == 2 and misplaced(student.backbone.named_parameters(), CPU, torch.float32) == []
    student.backbone.to(torch.bfloat16)  # frozen again, as load_student would put it
    prompt = init_from_vocab(student.word_embeddings, 2, torch.Generator().manual_seed(0))
    assert prompt.weight.dtype == torch.float32
    tuned = tune_prompt(student, prompt, data, TuneConfig(batch_size=8, target_epsilon=4.0), insecure_seed=1)
    assert misplaced(tuned.prompt.named_parameters(), CPU, torch.float32) == []
    assert np.isfinite(tuned.mean_loss) and np.isfinite(tuned.epsilon) and tuned.noise_multiplier > 0
    assert misplaced(student.backbone.named_parameters(), CPU, torch.bfloat16) == []  # frozen weights untouched
    enc = student.encode(public.texts)
    targets = compute_targets(student, tuned.prompt, teacher, enc, teacher.encode(public.texts), "vocab", 8, 2.0, 8)
    named = [(k, v) for k, v in vars(targets).items() if isinstance(v, torch.Tensor)]
    assert misplaced(named, CPU, torch.float32) == []
    moved = transfer_prompt(student, tuned.prompt, teacher, public, TransferConfig(steps=3, batch_size=8))
    assert misplaced(moved.prompt.named_parameters(), CPU, torch.float32) == [] and np.isfinite(moved.last_loss)
    rnd = train_clients_batched(student, tuned.prompt.weight.detach(), {0: data, 1: make_sentiment(16, seed=6)},
                                TuneConfig(batch_size=8, target_epsilon=4.0), insecure_seeds={0: 1, 1: 2})
    for out in rnd.clients.values():
        assert out.prompt.dtype == torch.float32 and out.update.dtype == np.float32 and np.isfinite(out.update).all()


# ---------------------------------------------------------------- the benchmark
def test_bench_device_runs_every_stage_on_a_cpu(tmp_path, tiny_dirs, files):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_device.py"
    spec = importlib.util.spec_from_file_location("bench_device", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    args = ["--small", "--transfer-steps", "6", "--run-dir", str(tmp_path / "run"), "--out", str(out),
            "--set", "compute.device=\"cpu\""]
    for k, v in _settings(tiny_dirs, files).items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    assert bench.main(args) == 0
    result = json.loads(out.read_text())
    assert result["compute"]["device"] == "cpu" and result["compute"]["dtype"] == "float32"
    assert set(result["stages_seconds"]) == {"load_task_and_teacher", "distill", "tune", "transfer", "tune_teacher",
                                             "evaluate"}
    assert all(s > 0 for s in result["stages_seconds"].values())
    assert result["transfer_long"]["steps"] == 6 and result["transfer_long"]["seconds_per_step"] > 0
    assert result["settings"]["distill"]["cache"] is False and 0 <= result["accuracy"]["teacher_zero_shot"] <= 1
