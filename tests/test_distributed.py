"""A study split into tasks: shards of the sweep pooled exactly, ``--shard`` + ``merge``, and Ray.

The reference everywhere is the one-process study (``run_study`` with the local engine) on the
same models, text and settings: the split study must give the same tables bit for bit (a shard
is a run of whole batches, computed as one process computes it; the pooled sweep functions take
per-sequence sums in one order). The Ray tests start a local Ray cluster (this machine only)
with two worker processes and stop it at the end of each test, failed or not. Without Ray
installed they are skipped, unless ``SOI_REQUIRE_RAY=1`` (``make test`` sets it): then they fail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stages_of_inference import robustness_sweep
from stages_of_inference.results import Result
from stages_of_inference.robustness import finish_sweep, sweep_partial
from stages_of_inference.study import run_study
from stages_of_inference.study.config import StudyConfig
from stages_of_inference.study.folder import StudyFolder, load_study
from stages_of_inference.study.registry import REGISTRY, default_analyses
from stages_of_inference.study.sharded import MergeError, merge_studies, parse_shard, run_shard
from stages_of_inference.study.tasks import TaskStore, assign_shards, shard_rows, study_tasks
from tests.test_report import _tiny

try:
    import ray  # noqa: F401
    HAS_RAY = True
except ImportError:
    HAS_RAY = False

needs_ray = pytest.mark.skipif(not HAS_RAY and os.environ.get("SOI_REQUIRE_RAY") != "1",
                               reason="Ray is not installed (pip install 'stages-of-inference[ray]')")

TOL = 1e-6
WORDS = 101


# --------------------------------------------------------------------------- helpers
def assert_same_tables(a: Result, b: Result, where: str, tol: float = 0.0) -> None:
    """Every table of ``a`` in ``b``: same columns, same non-float values, floats within ``tol``
    (relative to max(|value|, 1) for large numbers such as activation norms; 0: bit for bit)."""
    assert sorted(a.tables) == sorted(b.tables), where
    for name, x in a.tables.items():
        y = b.tables[name]
        assert list(x.columns) == list(y.columns) and x.shape == y.shape, f"{where} {name}"
        for column in x.columns:
            u, v = x[column].reset_index(drop=True), y[column].reset_index(drop=True)
            if u.dtype.kind == "f":
                uu, vv = u.to_numpy(float), v.to_numpy(float)
                assert (np.isnan(uu) == np.isnan(vv)).all(), f"{where} {name}.{column}: NaN differs"
                gap = np.abs(uu - vv) / np.maximum(1.0, np.abs(uu))
                assert np.nanmax(gap, initial=0.0) <= tol, f"{where} {name}.{column}: {np.nanmax(gap)}"
            else:
                assert u.astype(str).equals(v.astype(str)), f"{where} {name}.{column}"


def assert_same_study(reference, other) -> None:  # noqa: ANN001 - two Study objects
    assert list(reference.results) == list(other.results)
    for model, done in reference.results.items():
        assert sorted(done) == sorted(other.results[model]), model
        for analysis, result in done.items():
            assert_same_tables(result, other.results[model][analysis], f"{model} {analysis}")
            ours = other.results[model][analysis].provenance["study_fingerprint"]
            assert ours == result.provenance["study_fingerprint"], f"{model} {analysis}: fingerprint"


def _word_tokenizer(folder: Path):  # noqa: ANN202 - a PreTrainedTokenizerFast saved in folder
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<bos>", "<unk>"] + [f"w{i}" for i in range(WORDS - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>")
    fast.save_pretrained(folder)


def tiny_folder(folder: Path, seed: int) -> str:
    """A tiny random Llama saved as a transformers folder with a word tokenizer: a model any
    process loads by name (the folder), as Ray's workers must."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=WORDS, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config.architectures = ["LlamaForCausalLM"]  # what the converters pick the architecture by
    model = tf.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)  # blocks that change the output noticeably
    model.save_pretrained(folder, safe_serialization=True)
    _word_tokenizer(folder)
    return str(folder)


TINY_ANALYSES = ("robustness", "previous_token_attention", "logit_lens", "layer_similarity", "neurons", "sharpening",
                 "repetition", "sublayers", "sinks")


def _tiny_config(corpus: Path, names: tuple[str, ...], **kw) -> StudyConfig:  # noqa: ANN003
    return StudyConfig(**{"models": names, "corpus": str(corpus), "n_tokens": 96, "seq_len": 16, "batch_size": 2,
                          "analyses": TINY_ANALYSES, "static_formats": (), **kw})


# --------------------------------------------------------------------------- the split itself
def test_shards_are_fixed_contiguous_slices_and_cover_the_batch() -> None:
    for n_rows in (2, 5, 8, 13):
        for n in range(1, n_rows + 1):
            rows = [shard_rows(n_rows, i, n) for i in range(n)]
            covered = [r for s in rows for r in range(n_rows)[s]]
            assert covered == list(range(n_rows)) and all(s.stop > s.start for s in rows)
    with pytest.raises(ValueError, match="shard must lie in 0 .. 1"):
        shard_rows(4, 2, 2)
    assert parse_shard("1/1") == (0, 1) and parse_shard("3/4") == (2, 4)
    for bad in ("0/2", "3/2", "a/b", "2"):
        with pytest.raises(ValueError, match="I/N"):
            parse_shard(bad)


def test_only_split_analyses_are_sharded_and_needs_stay_together() -> None:
    config = StudyConfig(models=("a", "b"), n_tokens=512, batch_size=1)  # 4 sequences; the heavy batch has 2
    tasks = study_tasks(config, 8)
    sweep = [t for t in tasks if t.model == "a" and t.analysis == "robustness"]
    assert [t.shard for t in sweep] == [0, 1, 2, 3]  # at most one shard per batch
    # a shard is a run of whole batches: with batches of 3 sequences, 8 sequences make at most 3 shards
    assert [shard_rows(8, i, 3, batch_size=3) for i in range(3)] == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert [t.n_shards for t in study_tasks(StudyConfig(n_tokens=1024, batch_size=3), 8)
            if t.analysis == "robustness"] == [3, 3, 3]
    with pytest.raises(ValueError, match="at most 1 shards of 4 sequences in batches of 8"):
        shard_rows(4, 0, 2, batch_size=8)
    assert all(t.n_shards == 1 for t in tasks if not REGISTRY[t.analysis].split)
    for n in (2, 3):
        where = assign_shards(study_tasks(config, n), n)
        for model in ("a", "b"):
            by_name = {t.analysis: s for t, s in where.items() if t.model == model and t.n_shards == 1}
            assert by_name["sharpening"] == by_name["neurons"] == by_name["logit_lens"]
        assert {s for t, s in where.items() if t.analysis == "robustness"} == set(range(n))
        assert set(where.values()) <= set(range(n))
    with pytest.raises(ValueError, match="positive whole number"):
        study_tasks(config, 0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_sweep_of_shards_pooled_equals_the_sweep_of_all(tiny_models, tiny_tokens: torch.Tensor,
                                                            precision: str) -> None:  # noqa: ANN001
    model = tiny_models["llama"]
    whole = robustness_sweep(model, tiny_tokens, per_token=True, layer_effects=True, progress=False, batch_size=2,
                             precision=precision)
    parts = [sweep_partial(model, tiny_tokens[s], first_sequence=s.start, per_token=True, layer_effects=True,
                           progress=False, batch_size=2, precision=precision)
             for s in (shard_rows(len(tiny_tokens), i, 3) for i in range(3))]
    for order in (parts, parts[::-1]):  # the order the shards come back in does not matter
        merged = finish_sweep(order)
        assert_same_tables(whole, merged, f"sweep {precision}", tol=TOL)
    assert "shards" in finish_sweep(parts).provenance and len(finish_sweep(parts).provenance["shards"]) == 3
    # the standard errors are over all the sequences, not means of the shards' standard errors
    assert (merged.summary["kl_nats_sem"].iloc[1:] > 0).all()
    with pytest.raises(ValueError, match="same sequence"):
        finish_sweep([parts[0], parts[0]])


def test_task_damage_token_columns_filled_later_equal_the_given_sweep(tiny_models) -> None:  # noqa: ANN001
    from stages_of_inference.stages import task_damage as td

    model = _tiny("t", "llama")
    items = [("w1 w2 w3 w4 w5 w6", "w7"), ("w8 w9 w10 w11", "w12"), ("w3 w3 w4 w5", "w6")]
    prompts = torch.tensor([[0, 5, 6, 7, 8], [0, 9, 10, 11, 12]])
    tokens = torch.randint(1, 100, (3, 16), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0
    summary = robustness_sweep(model, tokens, progress=False).summary
    given = td.task_damage(model, items, prompts, new_tokens=3, progress=False, token_level=summary)
    later = td.task_damage(model, items, prompts, new_tokens=3, progress=False, token_level=False)
    assert later["token_accuracy"].isna().all()
    filled = td.with_token_level(later, summary)
    pd.testing.assert_frame_equal(filled, given)
    with pytest.raises(ValueError, match="token_level must be"):
        td.task_damage(model, items, prompts, new_tokens=3, progress=False, token_level=True)


# --------------------------------------------------------------------------- --shard and merge
def test_shard_runs_merged_equal_the_one_process_study(tmp_path: Path, corpus: Path) -> None:
    models = {"tiny-llama": _tiny("tiny-llama", "llama"), "tiny-gpt2": _tiny("tiny-gpt2", "gpt2", seed=1)}
    config = _tiny_config(corpus, tuple(models))
    reference = run_study(list(models.values()), config=config, out_dir=tmp_path / "one", progress=False, log=None,
                          write_report=False)
    n = 3
    for i in range(n):
        run_shard(config, i, n, tmp_path / f"shard{i}", loaded=models, log=None)
    with pytest.raises(MergeError, match=r"shard\(s\) 3 of 3 are missing"):
        merge_studies([tmp_path / "shard0", tmp_path / "shard1"], tmp_path / "merged", log=None)
    merged = merge_studies([tmp_path / f"shard{i}" for i in range(n)], tmp_path / "merged", log=None)
    assert_same_study(reference, merged)
    assert merged.report.exists() and (tmp_path / "merged" / "study.json").exists()
    # a merged study folder is a study: a local run into it reuses every analysis
    again = run_study(list(models.values()), config=config, out_dir=tmp_path / "merged", progress=False, log=None,
                      write_report=False)
    assert len(again.reused) == len(TINY_ANALYSES) * 2
    # a rerun of a shard reuses its stored tasks; a damaged task result is named and refused by merge
    lines: list[str] = []
    run_shard(config, 0, n, tmp_path / "shard0", loaded=models, log=lines.append)
    assert any("stored tasks reused" in line for line in lines)
    stored = next(TaskStore(StudyFolder(tmp_path / "shard1").tasks).folder.glob("*/*/*/*.parquet"))
    stored.write_bytes(stored.read_bytes()[:-20])
    with pytest.raises(MergeError, match="no result in the shard folders \\(or a damaged one\\).*run its shard again"):
        merge_studies([tmp_path / f"shard{i}" for i in range(n)], tmp_path / "merged2", log=None)
    # shards of different studies are refused
    other = dict(config.to_dict(), seed=1)
    run_shard(StudyConfig(**other), 2, n, tmp_path / "other", loaded=models, log=None)
    with pytest.raises(MergeError, match="different study settings \\(seed: 0 against 1"):
        merge_studies([tmp_path / "shard0", tmp_path / "shard1", tmp_path / "other"], tmp_path / "merged3", log=None)


@needs_ray
@pytest.mark.real
def test_the_default_study_is_bit_identical_in_one_process_in_shards_and_on_ray(tmp_path: Path, real_model,
                                                                                 ray_stopped) -> None:  # noqa: ANN001
    """Every default analysis of the embedded model, on a small budget, run three ways: in this
    process, as two ``--shard`` processes' worth of tasks merged (from the command line), and on a
    local Ray cluster (one worker of two CPUs: the same torch thread count as this process). The
    tables are equal bit for bit, fingerprints included, and every finished result carries the
    record of the one finishing step."""
    from stages_of_inference.cli import main
    from stages_of_inference.study.distributed import RayOptions

    flags = ["--model", "smollm2-135m", "--n-tokens", "128", "--seq-len", "32", "--batch-size", "2", "--cloze-items", "2",
             "--generation-prompts", "1", "--subjoiner-prompts", "16", "--tuned-lens-steps", "2", "--no-static", "--quiet"]
    config = StudyConfig(models=("smollm2-135m",), n_tokens=128, seq_len=32, batch_size=2, cloze_items=2,
                         generation_prompts=1, subjoiner_prompts=16, tuned_lens_steps=2, static_formats=())
    assert config.analyses == default_analyses()
    assert torch.get_num_threads() == 2, "the comparison with a worker of two CPUs needs two threads here"
    reference = run_study(real_model, config=config, out_dir=tmp_path / "one", progress=False, log=None,
                          write_report=False)
    for i in (1, 2):
        assert main(["run", *flags, "--shard", f"{i}/2", "--out-dir", str(tmp_path / f"s{i}")]) == 0
    assert main(["merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out-dir", str(tmp_path / "merged")]) == 0
    merged = load_study(tmp_path / "merged")
    assert_same_study(reference, merged)
    assert [t.n_shards for t in study_tasks(config, 2) if t.analysis == "robustness"] == [2, 2]
    ray = run_study(config=config, out_dir=tmp_path / "ray", log=None, engine="ray", write_report=False,
                    ray_options=RayOptions(workers=1, cpus_per_worker=2, shards=2))
    assert_same_study(reference, ray)
    for study in (reference, merged, ray):
        for result in study.results["smollm2-135m"].values():
            assert set(result.provenance) >= {"study_fingerprint", "study", "study_seconds", "model"}
    assert main(["run", *flags, "--shard", "1/2", "--workers", "2", "--out-dir", str(tmp_path / "x")]) == 2
    assert main(["merge", str(tmp_path / "nothing"), "--out-dir", str(tmp_path / "m")]) == 2


# --------------------------------------------------------------------------- Ray
@pytest.fixture
def ray_stopped():  # noqa: ANN201
    """Whatever a test does, no Ray session of this process outlives it."""
    yield
    if HAS_RAY:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def test_ray_options_and_engine_are_validated() -> None:
    from stages_of_inference.study.distributed import RayOptions, _check_reachable

    for bad, match in ((dict(workers=0), "workers must be"), (dict(cpus_per_worker=0), "cpus_per_worker"),
                       (dict(gpus_per_worker=-1), "gpus_per_worker"), (dict(max_retries=-1), "max_retries"),
                       (dict(shards=0), "shards must be"), (dict(address=""), "address must be")):
        with pytest.raises(ValueError, match=match):
            RayOptions(**bad)
    with pytest.raises(ValueError, match="engine must be one of local, ray"):
        run_study("smollm2-135m", engine="spark")
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match="no Ray head answers at 127.0.0.1:9 within 2 s"):
        _check_reachable("127.0.0.1:9", 2.0)  # the discard port: refused, or silent until the timeout
    assert time.perf_counter() - t0 < 30
    with pytest.raises(ValueError, match="'auto' or 'host:port'"):
        _check_reachable("nohost", 1.0)


def test_importing_the_library_does_not_import_ray() -> None:
    code = ("import sys, stages_of_inference, stages_of_inference.study.distributed, stages_of_inference.cli; "
            "sys.exit(1 if 'ray' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@needs_ray
def test_ray_two_workers_two_models_equal_the_one_process_study(tmp_path: Path, corpus: Path, ray_stopped) -> None:  # noqa: ANN001
    from stages_of_inference.study.distributed import RayOptions

    names = (tiny_folder(tmp_path / "tiny-a", 0), tiny_folder(tmp_path / "tiny-b", 1))
    config = _tiny_config(corpus, names)
    reference = run_study(config=config, out_dir=tmp_path / "one", progress=False, log=None, write_report=False)
    lines: list[str] = []
    study = run_study(config=config, out_dir=tmp_path / "ray", log=lines.append, engine="ray",
                      ray_options=RayOptions(workers=2, shards=3))
    assert_same_study(reference, study)
    assert study.report.exists() and not StudyFolder(tmp_path / "ray").tasks.exists(), "finished: the task results are gone"
    pids = {line.split("worker pid ")[1].split()[0] for line in lines if "worker pid" in line}
    assert len(pids) >= 2, "the tasks ran on two worker processes"
    import ray

    assert not ray.is_initialized(), "the local cluster the study started is stopped"
    with pytest.raises(ValueError, match="each worker asks for 1 GPU, and the cluster has 0"):
        run_study(config=config, out_dir=tmp_path / "gpu", log=None, engine="ray",
                  ray_options=RayOptions(workers=1, gpus_per_worker=1))
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def one_process_sweep(tmp_path_factory: pytest.TempPathFactory, real_model):  # noqa: ANN001, ANN201
    """The one-process study with the Ray workers' one torch thread (shared by the two Ray tests
    below): a BLAS may sum a product in another order with another number of threads, so
    bit-for-bit equality needs the same count."""
    config = StudyConfig(models=("smollm2-135m",), analyses=("robustness",), n_tokens=256, seq_len=64, batch_size=1,
                         static_formats=())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return config, run_study(real_model, config=config, out_dir=tmp_path_factory.mktemp("one"), progress=False,
                                 log=None, write_report=False)
    finally:
        torch.set_num_threads(threads)


@needs_ray
@pytest.mark.real
def test_ray_worker_killed_during_a_task_is_replaced_and_the_numbers_stay(tmp_path: Path, one_process_sweep,
                                                                          ray_stopped) -> None:  # noqa: ANN001
    from stages_of_inference.study.distributed import RayOptions, TaskFailedError

    config, reference = one_process_sweep
    killed: list[int] = []

    def log(line: str) -> None:
        lines.append(line)
        if "robustness [shard 1 of 4]: started on worker pid" in line and not killed:
            pid = int(line.rsplit(" ", 1)[1])
            killed.append(pid)
            threading.Timer(2.0, os.kill, (pid, signal.SIGKILL)).start()  # mid-task: a shard takes ~7 s

    lines: list[str] = []
    study = run_study(config=config, out_dir=tmp_path / "ray", log=log, engine="ray",
                      ray_options=RayOptions(workers=2, shards=4))
    assert killed and any(f"worker pid {killed[0]} died; run again on a new worker (retry 1 of 2)" in x for x in lines)
    assert_same_study(reference, study)
    # with no retries left, the study stops and names the task
    killed.clear()
    lines.clear()
    with pytest.raises(TaskFailedError, match=r"smollm2-135m robustness \[shard 1 of 4\]: its worker died 1 times"):
        run_study(config=config, out_dir=tmp_path / "ray2", log=log, engine="ray",
                  ray_options=RayOptions(workers=2, shards=4, max_retries=0))


@needs_ray
@pytest.mark.real
def test_ray_driver_interrupted_resumes_from_the_stored_tasks(tmp_path: Path, one_process_sweep,
                                                              ray_stopped) -> None:  # noqa: ANN001
    config, reference = one_process_sweep
    out = tmp_path / "ray"
    command = [sys.executable, "-m", "stages_of_inference.cli", "run", "--ray", "--workers", "2", "--shards", "4",
               "--model", "smollm2-135m", "--analyses", "robustness", "--n-tokens", "256", "--seq-len", "64",
               "--batch-size", "1", "--no-static", "--quiet",
               "--out-dir", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    driver = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not list(TaskStore(StudyFolder(out).tasks).folder.glob("*/*/*/provenance.json")):
            assert driver.poll() is None and time.monotonic() < deadline, "no task finished"
            time.sleep(0.5)
        driver.send_signal(signal.SIGINT)
        assert driver.wait(timeout=120) == 130
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    stored = list(TaskStore(StudyFolder(out).tasks).folder.glob("*/*/*/provenance.json"))
    assert 1 <= len(stored) < 4 and not (out / "study.json").exists()
    assert not [p for p in out.rglob("*.tmp")], "nothing half-written"
    lines: list[str] = []
    from stages_of_inference.study.distributed import RayOptions

    study = run_study(config=config, out_dir=out, log=lines.append, engine="ray", ray_options=RayOptions(workers=2, shards=4))
    assert any(f"{len(stored)} stored tasks reused" in line for line in lines), lines[:5]
    started = [line for line in lines if "started on worker" in line]
    assert len(started) == 4 - len(stored)
    assert_same_study(reference, study)
    assert json.loads((out / "study.json").read_text())["analyses"] == ["robustness"]
