"""Exported ExecuTorch programs against eager PEFT / Opacus, run by ExecuTorch's own runtime."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from executorch.exir._serialize._program import deserialize_pte_binary
from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer

from fedmilm.adapters import build_adapter_space
from fedmilm.data.chat import IGNORE, Example, collate
from fedmilm.export import PhonePrograms, export_bundle, train_with_programs
from fedmilm.export.bundle import ensure_bundle, export_fingerprint
from fedmilm.export.job import JobResult, TrainJob
from fedmilm.export.manifest import Manifest
from fedmilm.export.phone_runtime import ExecuTorchRuntime
from fedmilm.export.ptd import adapter_to_ptd, ptd_to_adapter, read_ptd, write_ptd
from fedmilm.export.runtime import pad_to_program
from fedmilm.privacy import Accountant
from fedmilm.privacy.randomness import SeededRandom
from fedmilm.training import DpSgd, per_example_loss, planned_steps, train_local, train_phone
from fedmilm.training.memory import MemoryPlan
from fedmilm.training.runtimes import EagerRuntime, runtime_class
from tests.conftest import tiny_config

pytestmark = [pytest.mark.export,  # lowering the model takes ~40 s: `make test-fast` skips it
              pytest.mark.filterwarnings("ignore:Full backward hook is firing")]
SEQ, MICRO, BATCH = 24, 3, 4
OVERRIDES = (f"data.max_length={SEQ}", f"client.micro_batch={MICRO}", f"train.batch_size={BATCH}",
             "personalization=dual", "privacy=sample", "privacy.sample.noise_multiplier=0.8",
             "train.lr=0.01")


def random_examples(count: int, seed: int) -> list[Example]:
    """Fresh random token sequences (never seen at export), labels on a random suffix."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        length = int(torch.randint(6, SEQ + 1, (1,), generator=gen))
        ids = torch.randint(0, 2000, (length,), generator=gen).tolist()
        start = int(torch.randint(1, length - 2, (1,), generator=gen))
        out.append(Example(ids, [IGNORE] * start + ids[start:]))
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny model with a random (non-zero) adapter, exported with the DP program."""
    cfg = tiny_config(*OVERRIDES)
    space = build_adapter_space(cfg.model, cfg.lora, mode="dual", seed=0)
    gen = torch.Generator().manual_seed(11)
    start = {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in space.initial.items()}
    space.load(start)
    folder = tmp_path_factory.mktemp("bundle")
    manifest, timings = export_bundle(space, cfg, folder)
    return cfg, space, start, PhonePrograms.load(folder), timings


def _eager(space, start, examples, *, dp=None, seed=7, micro_batch=MICRO):
    space.load(start)
    stats = train_local(space.model, space.trainable_parameters(), examples, epochs=2,
                        batch_size=BATCH, lr=0.01, weight_decay=0.0,
                        pad_id=space.tokenizer.pad_token_id, seed=seed, dp=dp,
                        micro_batch=micro_batch)
    return space.state(tuple(space.initial)), stats


def _assert_same_training(eager, programs_out, start):
    moved = max(float((eager[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3  # training really changed the adapter
    for key in start:
        # AdamW normalises each step, so float rounding in a near-zero gradient can move a
        # coordinate by a sliver of one step (lr = 0.01): 1e-4 is 1% of it (XNNPACK sums its
        # products in another order than PyTorch: one coordinate in 256 moved 5e-5).
        torch.testing.assert_close(programs_out[key], eager[key], rtol=1e-4, atol=1e-4)


def _on_device(programs, state, examples, *, seed, dp=None):
    job = TrainJob(epochs=2, batch_size=BATCH, sampling="poisson" if dp else "shuffle",
                   noise_multiplier=dp[0] if dp else None, max_grad_norm=dp[1] if dp else None,
                   seed=seed)
    job = TrainJob.from_json(job.to_json())  # what the phone reads
    blob, result = train_with_programs(programs, adapter_to_ptd(programs.manifest, state),
                                       examples, job)
    return ptd_to_adapter(programs.manifest, blob), JobResult.from_json(result.to_json())


def test_exported_training_matches_eager_peft(exported):
    cfg, space, start, programs, _ = exported
    examples = random_examples(10, seed=1)
    eager, stats = _eager(space, start, examples)
    trained, et_stats = _on_device(programs, start, examples, seed=7)
    _assert_same_training(eager, trained, start)
    assert (et_stats.steps, et_stats.examples, et_stats.tokens) == (stats.steps, stats.examples,
                                                                    stats.tokens)
    assert et_stats.loss == pytest.approx(stats.loss, rel=1e-5)


def test_exported_dp_step_matches_opacus_through_the_phone_path(exported):
    """`train_phone` eager (Opacus, micro-batches) vs `train_phone` through the programs."""
    cfg, space, start, programs, _ = exported
    examples = random_examples(12, seed=2)
    global_state = {k: start[k] for k in space.global_keys}
    personal_state = {k: start[k] for k in space.personal_keys}
    outcomes, accountants = [], []
    for runtime in (EagerRuntime(space, MemoryPlan(MICRO, False, 0)), ExecuTorchRuntime(programs)):
        accountant = Accountant("prv")
        outcomes.append(train_phone(
            runtime, global_state=global_state, personal_state=personal_state,
            examples=examples, train=cfg.train, seed=3,
            dp=DpSgd(0.8, 1.0, accountant, SeededRandom(3))))
        accountants.append(accountant)
    eager, device = outcomes
    eager_state = {**{k: global_state[k] + v for k, v in eager.update.items()}, **eager.personal}
    device_state = {**{k: global_state[k] + v for k, v in device.update.items()},
                    **device.personal}
    _assert_same_training(eager_state, device_state, start)
    planned = planned_steps(len(examples), epochs=cfg.train.epochs,
                            batch_size=cfg.train.batch_size)
    assert accountants[1].history == accountants[0].history  # charged once, for every step
    assert accountants[0].steps == planned > 0
    assert device.stats.steps == eager.stats.steps
    # Another noise draw (seed) gives another result: the noise really enters the step.
    other, _ = _on_device(programs, start, examples, seed=4, dp=(0.8, 1.0))
    mine, _ = _on_device(programs, start, examples, seed=3, dp=(0.8, 1.0))
    assert max(float((other[k] - mine[k]).abs().max()) for k in start) > 1e-4
    # A real phone's job carries no seed: its CSPRNG makes every run different.
    first, _ = _on_device(programs, start, examples, seed=None, dp=(0.8, 1.0))
    again, _ = _on_device(programs, start, examples, seed=None, dp=(0.8, 1.0))
    assert max(float((first[k] - again[k]).abs().max()) for k in start) > 1e-4


def test_jobs_are_validated():
    with pytest.raises(ValueError, match="sampling=poisson only"):
        TrainJob(epochs=1, batch_size=2, sampling="poisson", noise_multiplier=None,
                 max_grad_norm=None)
    with pytest.raises(ValueError, match="not one of"):
        TrainJob(epochs=1, batch_size=2, sampling="random", noise_multiplier=None,
                 max_grad_norm=None)


def test_dp_program_adds_the_supplied_noise_divided_by_the_expected_batch(exported):
    cfg, space, start, programs, _ = exported
    module = programs.module("dp_grad")
    keys = programs.manifest.peft_keys()
    batch = pad_to_program(collate(random_examples(2, seed=5), 0), rows=MICRO, seq_len=SEQ,
                           pad_id=0)
    adapter = [start[k] for k in keys]
    zeros = [torch.zeros_like(t) for t in adapter]
    noise = [torch.randn(t.shape) for t in adapter]
    quiet = module.run_method("forward", (*adapter, batch.input_ids, batch.attention_mask,
                                          batch.labels, *zeros))
    noisy = module.run_method("forward", (*adapter, batch.input_ids, batch.attention_mask,
                                          batch.labels, *noise))
    for q, n, z in zip(quiet, noisy, noise, strict=False):
        torch.testing.assert_close(n - q, z / BATCH, rtol=1e-4, atol=1e-6)
    losses = noisy[-1]
    assert losses.shape == (MICRO,) and float(losses[2]) == 0.0  # the padded row
    # Each real row's clipped gradient has norm <= max_grad_norm, so their sum <= 2 * C.
    total = torch.cat([(q * BATCH).flatten() for q in quiet[:-1]]).norm()
    assert float(total) <= 2 * cfg.privacy.sample.max_grad_norm + 1e-5


def test_the_adapter_inputs_take_effect_and_the_programs_need_the_base(exported):
    cfg, space, start, programs, _ = exported
    manifest = programs.manifest
    batch = collate(random_examples(MICRO, seed=6), space.tokenizer.pad_token_id)
    padded = pad_to_program(batch, rows=MICRO, seq_len=SEQ, pad_id=space.tokenizer.pad_token_id)
    weights = torch.full((MICRO,), 1.0 / MICRO)
    inputs = (padded.input_ids, padded.attention_mask, padded.labels, weights)
    gen = torch.Generator().manual_seed(9)
    for state in (start, {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in
                          start.items()}):
        space.load(state)
        with torch.no_grad():
            eager = float(per_example_loss(space.model, batch).mean())
        adapter = [state[k] for k in manifest.peft_keys()]
        loss = programs.module("train").run_method("forward", (*adapter, *inputs))[-1]
        assert float(loss) == pytest.approx(eager, rel=1e-5)
    with pytest.raises(RuntimeError):  # the base lives only in base.ptd
        _load_for_executorch_from_buffer((programs.folder / "train.pte").read_bytes()).run_method(
            "forward", (*adapter, *inputs))


def test_the_evaluation_program_matches_eager_evaluation(exported):
    """Base, base + global, base + global + personal through ExecuTorch vs the eager model."""
    _, space, start, programs, _ = exported
    examples = random_examples(7, seed=8)  # 7 rows: the last micro-batch is padded
    gen = torch.Generator().manual_seed(12)
    global_state = {k: start[k] + 0.05 * torch.randn(start[k].shape, generator=gen)
                    for k in space.global_keys}
    personal_state = {k: start[k] for k in space.personal_keys}
    losses = [runtime.evaluate(global_state=global_state, personal_state=personal_state,
                               examples=examples, batch_size=MICRO, loss_base=None)
              for runtime in (EagerRuntime(space), ExecuTorchRuntime(programs))]
    (eager_base, eager_global, eager_personal), (base, global_, personal) = losses
    assert base == pytest.approx(eager_base, rel=1e-5)
    assert global_ == pytest.approx(eager_global, rel=1e-5)
    assert personal == pytest.approx(eager_personal, rel=1e-5)
    assert len({round(v, 4) for v in (base, global_, personal)}) == 3  # three different models


def test_only_the_model_program_in_use_keeps_its_working_memory(exported):
    """Train, evaluate, train again: the phone's peak is the base plus one program's arena,
    and a program loaded again computes what it did the first time."""
    _, space, start, programs, _ = exported
    examples = random_examples(6, seed=13)
    first, _ = _on_device(programs, start, examples, seed=7)
    assert programs.loaded == {"train", "adamw"}
    ExecuTorchRuntime(programs).evaluate(
        global_state={k: first[k] for k in space.global_keys},
        personal_state={k: first[k] for k in space.personal_keys}, examples=examples,
        batch_size=MICRO, loss_base=None)
    assert programs.loaded == {"eval", "adamw"}
    again, _ = _on_device(programs, start, examples, seed=7)
    assert programs.loaded == {"train", "adamw"}
    assert all(torch.equal(first[k], again[k]) for k in start)


def test_every_model_program_loads_the_one_base_file(exported):
    _, _, _, programs, timings = exported
    manifest = programs.manifest
    assert {n for n, p in manifest.programs.items() if p.data_file == "base.ptd"} == {
        "train", "eval", "dp_grad"}
    assert manifest.base.size == timings.sizes["base.ptd"]
    assert manifest.base.sha256 == hashlib.sha256(
        (programs.folder / "base.ptd").read_bytes()).hexdigest()
    for name in ("train.pte", "eval.pte", "dp_grad.pte"):  # programs only: the base is outside
        assert timings.sizes[name] < timings.sizes["base.ptd"] / 10, name


def test_a_bundle_refuses_a_base_file_it_was_not_exported_with(exported, tmp_path):
    cfg = exported[0]
    other_space = build_adapter_space(cfg.model, cfg.lora, mode="dual", seed=5)  # other weights
    other = tmp_path / "other"
    export_bundle(other_space, cfg, other, with_dp=False)
    folder = _copy_bundle(exported, tmp_path)
    shutil.copy(other / "base.ptd", folder / "base.ptd")  # same size, another model's weights
    with pytest.raises(ValueError, match="another model's base"):
        PhonePrograms.load(folder)
    (folder / "base.ptd").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="another model's base"):
        PhonePrograms.load(folder)


def test_ptd_round_trips_and_refuses_mismatches(exported):
    _, _, start, programs, _ = exported
    manifest = programs.manifest
    blob = adapter_to_ptd(manifest, start)
    back = ptd_to_adapter(manifest, blob)
    assert set(back) == set(start) and all(torch.equal(back[k], start[k]) for k in start)
    exported_ptd = read_ptd((programs.folder / "adapter.ptd").read_bytes())
    assert set(exported_ptd) == {t.program_key for t in manifest.adapter}
    assert all(torch.equal(programs.initial[k], v) for k, v in exported[1].initial.items())
    first = manifest.adapter[0]
    with pytest.raises(KeyError, match="missing"):
        adapter_to_ptd(manifest, {k: v for k, v in start.items() if k != first.peft_key})
    with pytest.raises(ValueError, match="shape"):
        adapter_to_ptd(manifest, {**start, first.peft_key: torch.zeros(1, 1)})
    with pytest.raises(ValueError, match="does not match"):
        ptd_to_adapter(manifest, write_ptd({"stranger": torch.zeros(2)}))


def test_manifest_describes_the_programs_as_executorch_sees_them(exported):
    cfg, space, _, programs, timings = exported
    manifest = Manifest.read(programs.folder)
    assert manifest == programs.manifest
    assert (manifest.micro_batch, manifest.seq_len) == (MICRO, SEQ)
    assert [t.peft_key for t in manifest.adapter] == list(space.initial)
    assert {t.part for t in manifest.adapter} == {"global", "personal"}
    assert manifest.hyper_parameters["lr"] == cfg.train.lr
    assert manifest.tokenizer["pad_token_id"] == space.tokenizer.pad_token_id
    assert (programs.folder / "tokenizer" / "tokenizer.json").is_file()
    for name, spec in manifest.programs.items():
        meta = programs.module(name).method_meta(spec.method)
        plan = deserialize_pte_binary((programs.folder / spec.file).read_bytes()
                                      ).program.execution_plan[0]
        assert spec.planned_bytes == sum(plan.non_const_buffer_sizes) > 0, name
        assert meta.num_inputs() == len(spec.inputs), name
        for index, tensor in enumerate(spec.inputs):
            assert list(meta.input_tensor_meta(index).sizes()) == tensor.shape, (name, index)
    assert set(timings.sizes) == {"train.pte", "eval.pte", "adamw.pte", "dp_grad.pte",
                                  "base.ptd", "adapter.ptd"}


def test_the_manifest_matches_its_json_schema(exported):
    """What the exporter writes validates against clients/android/schemas/manifest.schema.json;
    a manifest whose base leaves the bundle, or of another format, does not."""
    from tests.fedmilm.export.test_schemas import schema

    manifest = json.loads((exported[3].folder / "manifest.json").read_text())
    validator = schema("manifest")
    validator.validate(manifest)
    for bad in ({**manifest, "base": {**manifest["base"], "file": "../../etc/passwd"}},
                {**manifest, "format_version": 2},
                {**manifest, "delegate": "gpu"}):
        assert list(validator.iter_errors(bad))


def test_batches_larger_than_the_program_are_refused():
    batch = collate(random_examples(2, seed=3), 0)
    with pytest.raises(ValueError, match="re-export"):
        pad_to_program(batch, rows=1, seq_len=SEQ, pad_id=0)


def test_a_bundle_for_another_config_is_refused(exported, tmp_path):
    _, space, _, programs, _ = exported
    other = tiny_config(*OVERRIDES, "train.lr=0.05", "client.runtime=executorch",
                        f"client.export_dir={programs.folder}")
    with pytest.raises(ValueError, match="exported for another config"):
        ensure_bundle(space, other, tmp_path)


def test_the_server_exports_once_per_run_and_reuses_it_on_resume(tmp_path):
    cfg = tiny_config(f"data.max_length={SEQ}", "client.micro_batch=2", "client.runtime=executorch")
    space = build_adapter_space(cfg.model, cfg.lora, mode=cfg.personalization.mode, seed=0)
    folder = ensure_bundle(space, cfg, tmp_path)
    assert folder == tmp_path / "export"
    manifest = Manifest.read(folder)
    assert "dp_grad" not in manifest.programs and manifest.micro_batch == 2
    stamp = (folder / "train.pte").stat().st_mtime_ns
    assert ensure_bundle(space, cfg, tmp_path) == folder
    assert (folder / "train.pte").stat().st_mtime_ns == stamp  # not exported again
    assert not list(tmp_path.glob(".export.partial-*"))  # nothing half-written left behind


@pytest.mark.parametrize("job,needle", [
    ({"noise_multiplier": 0.0}, "must be > 0"),
    ({"noise_multiplier": -5.0}, "must be > 0"),
    ({"max_grad_norm": -1.0}, "must be > 0"),
    ({"epochs": 10**9}, "epochs must be in"),
    ({"epochs": "3"}, "epochs must be a int"),
    ({"batch_size": True}, "batch_size must be a int"),
])
def test_job_values_from_the_wire_are_bounded(job, needle):
    good = {"epochs": 1, "batch_size": 2, "sampling": "poisson", "noise_multiplier": 1.0,
            "max_grad_norm": 1.0, "seed": None, "version": 1}
    with pytest.raises(ValueError, match=needle):
        TrainJob.from_json(json.dumps({**good, **job}))


def _copy_bundle(exported, tmp_path):
    folder = tmp_path / "bundle"
    shutil.copytree(exported[3].folder, folder)
    return folder


def test_a_program_with_one_flipped_byte_is_refused(exported, tmp_path):
    folder = _copy_bundle(exported, tmp_path)
    blob = bytearray((folder / "train.pte").read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (folder / "train.pte").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="sha256"):
        PhonePrograms.load(folder)


def test_random_bytes_are_refused_before_the_runtime_sees_them(exported, tmp_path):
    """Even with a manifest that vouches for them: the runtime would abort the process."""
    folder = _copy_bundle(exported, tmp_path)
    junk = bytes(range(256)) * 64
    (folder / "adamw.pte").write_bytes(junk)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["sha256"]["adamw.pte"] = hashlib.sha256(junk).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not an ExecuTorch program"):
        PhonePrograms.load(folder)


@pytest.mark.parametrize("name", ["../train.pte", "/etc/passwd", "sub/train.pte", ""])
def test_manifest_paths_stay_inside_the_bundle(exported, tmp_path, name):
    folder = _copy_bundle(exported, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["programs"]["train"]["file"] = name
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="inside the bundle"):
        PhonePrograms.load(folder)


def test_the_export_fingerprint_does_not_depend_on_the_hosts_cache_path():
    a = tiny_config(*OVERRIDES, "model.cache_dir=/home/alice/.cache/fedmilm")
    b = tiny_config(*OVERRIDES, "model.cache_dir=/srv/cache")
    assert export_fingerprint(a) == export_fingerprint(b)
    assert export_fingerprint(a) != export_fingerprint(tiny_config(*OVERRIDES, "seed=9"))


def test_an_int8_base_trains_and_evaluates_through_executorch_as_eager_int8_does(exported,
                                                                                  tmp_path):
    """The base stays int8 in base.ptd (dequantized a layer at a time inside the programs);
    training and evaluation on fresh random data match the eager int8 phone."""
    cfg = tiny_config(*OVERRIDES, "model.quantization=int8", "personalization=none")
    space = build_adapter_space(cfg.model, cfg.lora, mode="none", seed=0)
    gen = torch.Generator().manual_seed(13)
    start = {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in space.initial.items()}
    space.load(start)
    manifest, timings = export_bundle(space, cfg, tmp_path / "int8", with_dp=False)
    programs = PhonePrograms.load(tmp_path / "int8")
    float_base = exported[4].sizes["base.ptd"]
    decoder = sum(p.numel() for n, p in space.model.named_parameters() if ".layers." in n
                  and "lora_" not in n and p.dim() == 2)
    assert manifest.base.quantization == "int8"
    assert timings.sizes["base.ptd"] < float_base - 2.5 * decoder  # 1 byte per weight, not 4
    (eager, eager_stats), (device, device_stats), losses = _eager_and_device(
        space, programs, start, random_examples(9, seed=14), cfg)
    _assert_same_training(eager, device, start)
    assert device_stats.loss == pytest.approx(eager_stats.loss, rel=1e-5)
    assert losses[1][:2] == pytest.approx(losses[0][:2], rel=1e-5)


def _eager_and_device(space, programs, start, examples, cfg):
    """Train from `start` eagerly and through `programs` (same data and seed), then evaluate
    the eager result with both: ((eager, stats), (device, stats), [eager losses, device's])."""
    outcomes = [runtime.train(dict(start), examples, train=cfg.train, seed=2, dp=None)
                for runtime in (EagerRuntime(space, MemoryPlan(MICRO, False, 0)),
                                ExecuTorchRuntime(programs))]
    losses = [runtime.evaluate(global_state=outcomes[0][0], personal_state={},
                               examples=examples, batch_size=MICRO, loss_base=None)
              for runtime in (EagerRuntime(space), ExecuTorchRuntime(programs))]
    return outcomes[0], outcomes[1], losses


def test_an_executorch_phone_never_loads_the_eager_model(exported):
    cfg, space, start, programs, _ = exported
    phone_cfg = tiny_config(*OVERRIDES, "client.runtime=executorch",
                            f"client.export_dir={programs.folder}")

    def load_space():
        raise AssertionError("the ExecuTorch phone loaded the eager model")

    runtime = runtime_class("executorch").for_phone(phone_cfg, load_space)
    assert runtime.layout.global_keys == space.global_keys
    assert runtime.layout.personal_keys == space.personal_keys
    examples = random_examples(5, seed=15)
    trained, stats = runtime.train(dict(start), examples, train=cfg.train, seed=1, dp=None)
    assert stats.steps > 0 and set(trained) == set(start)
    base, global_, personal = runtime.evaluate(
        global_state={k: trained[k] for k in space.global_keys},
        personal_state={k: trained[k] for k in space.personal_keys}, examples=examples,
        batch_size=MICRO, loss_base=None)
    assert personal < base  # it learned what it trained on


def _delegates(folder, name: str) -> list[str]:
    program = deserialize_pte_binary((folder / f"{name}.pte").read_bytes()).program
    return [d.id for d in program.execution_plan[0].delegates]


def test_by_default_the_model_programs_run_their_products_in_xnnpack(exported):
    """The fixture's bundle is the default (`client.delegate=xnnpack`); the base stays in
    base.ptd all the same (checked above), and the AdamW program needs no delegate."""
    folder = exported[3].folder
    assert exported[3].manifest.delegate == "xnnpack"
    for name in ("train", "eval", "dp_grad"):
        assert _delegates(folder, name) and set(_delegates(folder, name)) == {"XnnpackBackend"}
    assert _delegates(folder, "adamw") == []


def test_a_runtime_without_the_bundles_backend_refuses_it_at_load(exported, monkeypatch):
    from executorch.extension.pybindings import portable_lib

    monkeypatch.setattr(portable_lib, "_get_registered_backend_names", lambda: [])
    with pytest.raises(ValueError, match="client.delegate=xnnpack, which this ExecuTorch"):
        PhonePrograms.load(exported[3].folder)


def test_programs_without_a_delegate_train_and_evaluate_as_eager_does(tmp_path):
    """`client.delegate=none`: ExecuTorch's own kernels run everything, to the same result."""
    cfg = tiny_config(*OVERRIDES, "personalization=none", "client.delegate=none")
    space = build_adapter_space(cfg.model, cfg.lora, mode="none", seed=0)
    gen = torch.Generator().manual_seed(16)
    start = {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in space.initial.items()}
    manifest, timings = export_bundle(space, cfg, tmp_path / "plain", with_dp=False)
    assert manifest.delegate == "none"
    assert export_fingerprint(cfg) != export_fingerprint(tiny_config(*OVERRIDES,
                                                                     "personalization=none"))
    programs = PhonePrograms.load(tmp_path / "plain")
    assert all(_delegates(programs.folder, name) == [] for name in manifest.programs)
    assert timings.sizes["train.pte"] < timings.sizes["base.ptd"] / 10
    (eager, _), (device, _), losses = _eager_and_device(space, programs, start,
                                                        random_examples(9, seed=17), cfg)
    _assert_same_training(eager, device, start)
    assert losses[1][:2] == pytest.approx(losses[0][:2], rel=1e-5)
