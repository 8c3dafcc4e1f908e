"""HLIP: studies and generated reports, slice / scan / study attention, the text tower, the contrastive
loss, `ar3d pretrain --objective hlip` and `ar3d findings`."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model_core.checkpoint.store import load_checkpoint, make_config, read_config, save_checkpoint
from model_core.cli import main
from model_core.data.reports import FINDINGS, compose_report, prompt_pair, report_sentences
from model_core.data.studies import (
    load_scan,
    make_phantom_study,
    phantom_study,
    studies_from_manifest,
    studies_from_paths,
)
from model_core.errors import Ar3dEnvironmentError, Ar3dInputError, CheckpointError
from model_core.io.volume import read_volume
from model_core.models.hlip import SCOPES, HLIPEncoder, block_scopes, merge_tokens, split_tokens, study_features
from model_core.models.vit import ViT3D, ViT3DConfig
from model_core.training.loop import LOSS_LOG

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ViT3DConfig(patch_size=8, width=24, depth=1, heads=2, max_subvolumes=40)
TEXT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


def vlp():
    """Skip unless the [vlp] extra (transformers, tokenizers) and open-clip-torch are installed."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from model_core.objectives.hlip import openclip_losses

    try:
        openclip_losses()
    except Ar3dEnvironmentError as exc:  # not installed
        pytest.skip(str(exc))


# ----------------------------------------------------------------------------- attention scopes


def _study(scans=3, shape=(16, 24, 16), seed=0) -> torch.Tensor:
    return torch.randn(2, scans, *shape, generator=torch.Generator().manual_seed(seed))  # (B, S, X, Y, Z)


@pytest.mark.parametrize("scope", SCOPES)
def test_a_token_never_attends_outside_its_scope(scope):
    torch.manual_seed(0)
    encoder = ViT3D(TINY).eval()
    volumes = _study()
    grid = encoder.grid(volumes.shape[-3:])  # (2, 3, 2): n = 12 patches per scan, 6 per z slab
    n = int(np.prod(grid))
    changed = volumes.clone()
    changed[:, 1, :, :, 8:] += 3.0  # scan 1, its second z slab only
    before, _ = study_features(encoder, volumes, (scope,))
    after, _ = study_features(encoder, changed, (scope,))
    moved = (after - before).abs().amax(dim=(0, 2)) > 1e-5  # (1 + S*n,): which tokens changed
    scan0 = moved[1:1 + n]
    slab0_scan1 = moved[1 + n:1 + 2 * n].reshape(grid)[:, :, 0]
    assert bool(moved[1 + n:1 + 2 * n].reshape(grid)[:, :, 1].all())  # the perturbed tokens themselves
    assert not bool(moved[1 + 2 * n:].any()) or scope == "study"  # scan 2 sees it only in study scope
    assert bool(scan0.any()) == (scope == "study")
    assert bool(slab0_scan1.any()) == (scope != "slice")  # the other slab of the same scan
    assert bool(moved[0])  # the class token sees every partition


def test_class_token_is_copied_into_each_partition_and_averaged_back():
    x = torch.randn(2, 1 + 3 * 12, 5)  # B = 2 studies of S = 3 scans on a (2, 3, 2) grid
    grid = (2, 3, 2)
    for scope, partitions in (("scan", 3), ("slice", 3 * 2), ("study", 1)):
        parts = split_tokens(x, scope, 3, grid)
        assert parts.shape[0] == 2 * partitions
        assert torch.equal(parts[:, 0], x[:, 0].repeat_interleave(partitions, dim=0))  # copies of each study's
        assert torch.equal(merge_tokens(parts, scope, 2, 3, grid), x)
        parts[:, 0] = torch.arange(parts.shape[0], dtype=torch.float32)[:, None]  # each copy its own value
        merged = merge_tokens(parts, scope, 2, 3, grid)
        expected = torch.arange(2 * partitions, dtype=torch.float32).reshape(2, partitions).mean(1)
        assert torch.allclose(merged[:, 0, 0], expected)


def test_layouts_and_a_study_scope_everywhere_is_the_plain_encoder():
    assert block_scopes("two-level", 12).index("study") == 2
    assert [i for i, s in enumerate(block_scopes("two-level", 12)) if s == "study"] == [2, 5, 8, 11]
    assert block_scopes("three-level", 4) == ("slice", "scan", "study", "slice")
    assert block_scopes("scan,study", 3) == ("scan", "study", "scan")
    with pytest.raises(Ar3dInputError, match="attention scopes"):
        block_scopes("scan,volume", 2)
    encoder = ViT3D(ViT3DConfig(patch_size=8, width=24, depth=2, heads=2)).eval()
    volumes = _study(scans=2)
    ours, blocks = HLIPEncoder(encoder, "study")(volumes, return_blocks=(1,))
    plain, plain_blocks = encoder(volumes, return_blocks=(1,))
    assert torch.allclose(ours, plain, atol=1e-6) and torch.allclose(blocks[0], plain_blocks[0], atol=1e-6)
    assert not list(HLIPEncoder(encoder).parameters(recurse=False))  # no parameter of its own
    with pytest.raises(Ar3dInputError, match="1 to 8"):
        study_features(encoder, _study(scans=9), ("study", "study"))  # max_subvolumes limits the scans


# ----------------------------------------------------------------------------- studies and generated reports


def test_phantom_studies_carry_their_findings_in_the_report():
    seen = set()
    for seed in range(4):
        study = phantom_study("ct", seed)
        made = make_phantom_study("ct", seed)
        assert [s.name for s in study.scans] == ["ct_plain", "ct_venous"] and study.generated
        shapes = {load_scan(s).array.shape for s in study.scans}
        assert len(shapes) == 2  # the series are not co-registered: different grids
        for finding in made.findings:
            words = FINDINGS[finding.kind]
            assert not any(sentence in study.report for sentence in words.normal)
            assert f"{finding.size_mm:.0f} mm" in study.report or f"{finding.volume_ml:.0f} ml" in study.report \
                or any(noun in study.report.lower() for noun in words.nouns)
            seen.add(finding.kind)
        assert set(study.findings) == {k for k, w in FINDINGS.items() if w.modality == "CT"}
        assert {k for k, v in study.findings.items() if v} == {f.kind for f in made.findings}
    assert len(seen) >= 2
    again = phantom_study("ct", 1)
    assert again.report == phantom_study("ct", 1).report  # deterministic by seed
    mri = [phantom_study("mri", seed) for seed in range(4)]
    assert {s.findings["brain_tumour"] for s in mri} == {True, False}
    for study in mri:
        assert study.report and ("oedema" in study.report) == study.findings["brain_tumour"]


def test_reports_shuffle_their_sentences_behind_the_prefix_and_prompts_pair_x_with_no_x():
    report = "A liver lesion. No splenomegaly. Normal kidneys."
    text = compose_report(report, "CT", np.random.default_rng(3))
    assert text.startswith("This CT study shows: ")
    assert sorted(report_sentences(text.split(": ", 1)[1])) == sorted(report_sentences(report))
    assert prompt_pair("enlarged spleen", "CT") == ("This CT study shows: enlarged spleen.",
                                                    "This CT study shows: no enlarged spleen.")


def _nifti(path, array, spacing=2.0):
    nib.save(nib.Nifti1Image(np.asarray(array), np.diag([spacing, spacing, spacing, 1.0])), str(path))
    return path


def test_a_studies_manifest_with_and_without_reports(tmp_path):
    image = np.random.default_rng(0).normal(100, 10, (20, 20, 10)).astype(np.float32)
    labels = np.zeros((20, 20, 10), np.uint8)
    labels[12:18, 5:10, 2:6] = 1  # on the patient's right (RAS x grows with i here)
    _nifti(tmp_path / "t1.nii.gz", image)
    _nifti(tmp_path / "flair.nii.gz", image[:16])  # another grid: not co-registered
    _nifti(tmp_path / "seg.nii.gz", labels)
    doc = {"studies": [
        {"id": "a", "modality": "MRI", "report": "A mass. No oedema.", "scans": ["t1.nii.gz", "flair.nii.gz"]},
        {"id": "b", "scans": [{"image": "t1.nii.gz", "name": "t1", "seg": "seg.nii.gz", "labels": {"1": "tumor"}}]},
        {"id": "c", "report": "x", "scans": ["t1.nii.gz"], "use": ["finetune"]},
    ]}
    (tmp_path / "studies.json").write_text(json.dumps(doc))
    studies = studies_from_manifest(tmp_path / "studies.json")
    assert [s.id for s in studies] == ["a", "b"]
    assert [s.name for s in studies[0].scans] == ["t1", "flair"] and not studies[0].generated
    assert studies[1].generated and "tumor" in studies[1].report.lower() and "right" in studies[1].report
    volume_ml = 6 * 5 * 4 * 8 / 1000
    assert f"{volume_ml:.1f}" in studies[1].report


@pytest.mark.parametrize("doc, problem", [
    ({"studies": [{"id": "s", "report": "x", "scans": []}]}, "study s has no scans"),
    ({"studies": [{"id": "s", "report": " ", "scans": ["t1.nii.gz"]}]}, "report must be non-empty"),
    ({"studies": [{"id": "s", "scans": ["t1.nii.gz"]}]}, 'no "report" and no scan with a "seg"'),
    ({"studies": [{"id": "s", "report": "x", "scans": ["gone.nii.gz"]}]}, "scan gone.nii.gz not found"),
    ({"cases": "nope"}, "manifest must be a list"),
])
def test_bad_studies_manifests_are_refused_naming_the_file(tmp_path, doc, problem):
    _nifti(tmp_path / "t1.nii.gz", np.zeros((8, 8, 8), np.float32))
    path = tmp_path / "studies.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(Ar3dInputError, match=problem) as err:
        studies_from_paths([path])
    assert str(path) in str(err.value)


# ----------------------------------------------------------------------------- text tower and loss


def test_tokenizer_round_trip_and_fixed_length():
    vlp()
    from model_core.models.text import ReportTokenizer, train_tokenizer

    corpus = [compose_report(phantom_study("ct", s).report, "CT") for s in range(3)]
    tokenizer = train_tokenizer(corpus, vocab_size=200, max_length=64)
    text = corpus[0]
    ids, mask = tokenizer([text, "no liver lesion"])
    assert ids.shape == mask.shape == (2, 64) and ids.dtype == torch.long
    assert int(mask[1].sum()) < 64 and int(ids[1, int(mask[1].sum())]) == tokenizer.tokenizer.token_to_id("[PAD]")
    decoded = tokenizer.decode(ids[0].tolist())
    assert "".join(decoded.split()) == "".join(text.lower().split())
    unseen = "zebra-striped osteoma"  # words outside the corpus still round-trip through word pieces or [UNK]
    assert tokenizer([unseen])[0].shape == (1, 64)
    path = tokenizer.save(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"tok-{os.getpid()}.json"))
    try:
        assert torch.equal(ReportTokenizer.load(path, 64)([text])[0], ids[:1])
    finally:
        os.remove(path)


def test_ranks_other_than_0_read_rank_0s_tokenizer_and_never_a_stale_one(tmp_path, monkeypatch):
    vlp()
    from model_core.errors import TrainingError
    from model_core.models.text import train_tokenizer
    from model_core.objectives import hlip

    path = tmp_path / "tokenizer.json"
    trained = train_tokenizer(["a liver lesion", "no liver lesion"], 100, 16)
    monkeypatch.setenv("RANK", "1")
    trained.save(path)
    os.utime(path, (hlip.PROCESS_START - 60, hlip.PROCESS_START - 60))  # a previous run's
    monkeypatch.setattr(hlip, "TOKENIZER_WAIT_S", 1)
    with pytest.raises(TrainingError, match="rank 0 wrote no tokenizer"):
        hlip.shared_tokenizer(path, lambda: pytest.fail("only rank 0 trains"), 16)
    trained.save(path)  # rank 0's, written now
    got = hlip.shared_tokenizer(path, lambda: pytest.fail("only rank 0 trains"), 16)
    assert got.tokenizer.to_str() == trained.tokenizer.to_str() and got.max_length == 16


def _objective(loss="clip"):
    from model_core.models.text import small_text_config
    from model_core.objectives.hlip import HLIPObjective

    torch.manual_seed(0)
    encoder = ViT3D(ViT3DConfig(patch_size=8, width=24, depth=3, heads=2, max_subvolumes=40))
    return HLIPObjective(encoder, text=small_text_config(50, 16, **TEXT), embed_dim=16, loss=loss)


def test_clip_loss_on_a_tiny_batch_is_openclips_symmetric_infonce():
    vlp()
    objective = _objective().eval()  # no dropout in the text tower: the two evaluations agree
    volumes = _study(scans=2)
    ids = torch.randint(5, 50, (2, 16))
    mask = torch.ones_like(ids)
    out = objective(volumes, ids, mask)
    image, text = objective.image_embedding(volumes), objective.text_embedding(ids, mask)
    logits = objective.logit_scale.exp() * image @ text.T
    labels = torch.arange(2)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(out["loss"], expected, atol=1e-5)
    out["loss"].backward()
    for name in ("encoder.patch_embed.weight", "text.model.embeddings.word_embeddings.weight", "logit_scale",
                 "image_proj.weight", "text.proj.weight"):
        assert dict(objective.named_parameters())[name].grad.abs().sum() > 0, name
    with torch.no_grad():
        objective.logit_scale.fill_(7.0)
    objective.after_step()
    assert objective.logit_scale.exp().item() == pytest.approx(100.0)


def test_siglip_loss_runs_with_its_bias():
    vlp()
    objective = _objective("siglip")
    out = objective(_study(scans=1), torch.randint(5, 50, (2, 16)), torch.ones(2, 16, dtype=torch.long))
    assert torch.isfinite(out["loss"]) and objective.logit_bias.item() == -10.0
    with pytest.raises(Ar3dInputError, match="contrastive loss"):
        _objective("triplet")


# ----------------------------------------------------------------------------- the command line

RUN = ["--workers", "0", "--device", "cpu", "--log-every", "1"]
HLIP = ["--objective", "hlip", "--set", "width=24", "--set", "depth=3", "--set", "heads=2", "--set", "patch_size=8",
        "--spacing", "8", "--crop", "32", "--slab", "24", "--scans", "2", "--embed-dim", "16", "--vocab-size", "150",
        "--max-length", "48", "--batch-size", "2", *[a for k, v in TEXT.items() for a in ("--text-set", f"{k}={v}")]]


@pytest.fixture(scope="module")
def hlip_model(tmp_path_factory):
    vlp()
    out = tmp_path_factory.mktemp("hlip") / "model"
    assert main(["pretrain", "--data", "phantom-studies:ct", "--phantoms", "2", "--out", str(out), "--steps", "2",
                 *HLIP, *RUN]) == 0
    return out


def test_pretrain_writes_both_towers_and_the_tokenizer_and_resumes(hlip_model, tmp_path):
    config = read_config(hlip_model)
    head = config["heads"]["hlip"]
    assert config["objective"] == "hlip" and head["scopes"] == ["scan", "scan", "study"]
    assert head["text"]["hidden_size"] == 32 and head["tokenizer"] == "tokenizer.json"
    assert config["encoder"]["max_subvolumes"] == 40 and config["provenance"]["sequence"]["n_sub"] == 2
    assert (hlip_model / "tokenizer.json").is_file()
    names = load_checkpoint(hlip_model).state_dict
    assert any(k.startswith("encoder.") for k in names) and any(k.startswith("text.model.") for k in names)
    copy = tmp_path / "resumed"
    subprocess.run(["cp", "-r", str(hlip_model), str(copy)], check=True)
    assert main(["pretrain", "--data", "phantom-studies:ct", "--phantoms", "2", "--out", str(copy), "--steps", "3",
                 "--resume", *RUN]) == 0
    with open(copy / LOSS_LOG, newline="") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1", "2", "3"]


def test_findings_prints_one_json_line_per_prompt_and_maps_on_the_first_scan(hlip_model, tmp_path, capsys):
    first, second = "phantom-studies:ct:7/ct_plain", "phantom-studies:ct:7/ct_venous"
    out = tmp_path / "maps"
    capsys.readouterr()
    assert main(["findings", "--model", str(hlip_model), "--prompt", "liver lesion", "--prompt", "enlarged spleen",
                 "--device", "cpu", "--out", str(out), first, second]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["prompt"] for r in rows] == ["liver lesion", "enlarged spleen"]
    assert all(set(r) == {"prompt", "probability"} and 0.0 <= r["probability"] <= 1.0 for r in rows)
    scan = load_scan(first)
    written = read_volume(out / "findings_liver_lesion.nii.gz")
    assert written.array.shape == scan.array.shape and np.allclose(written.affine, scan.affine, atol=1e-4)
    assert np.isfinite(written.array).all() and written.array.std() > 0
    assert (out / "findings_enlarged_spleen.nii.gz").is_file()


def test_findings_refuses_bad_input_with_one_clear_error(hlip_model, tmp_path, capsys):
    from model_core.inference.findings import find_findings, load_vision_language_model

    model = load_vision_language_model(hlip_model)
    scan = load_scan("phantom-studies:ct:7/ct_plain")
    with pytest.raises(Ar3dInputError, match="no scans"):
        find_findings(model, [], ["liver lesion"])
    with pytest.raises(Ar3dInputError, match="empty prompt"):
        find_findings(model, [scan], ["liver lesion", "  "])
    with pytest.raises(Ar3dInputError, match="at most 40 scans"):
        find_findings(model, [scan] * 41, ["liver lesion"])
    plain = tmp_path / "ar"
    encoder = ViT3D(TINY)
    save_checkpoint(plain, {f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                    make_config(TINY.to_dict(), objective="ar"))
    with pytest.raises(CheckpointError, match="has no text tower"):
        load_vision_language_model(plain)
    capsys.readouterr()
    for model_dir, args, problem in ((hlip_model, ["--prompt", "liver lesion"], "no scans"),
                                     (hlip_model, ["--prompt", " ", "x.nii.gz"], "empty prompt"),
                                     (plain, ["--prompt", "liver lesion", "x.nii.gz"], "has no text tower")):
        assert main(["findings", "--model", str(model_dir), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ar3d: error: ") and problem in err[0]


def test_zero_shot_benchmark_scores_every_finding_of_unseen_studies(hlip_model):
    import importlib.util

    spec = importlib.util.spec_from_file_location("findings_zero_shot", os.path.join(REPO, "benchmarks",
                                                                                      "findings_zero_shot.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from model_core.inference.findings import load_vision_language_model

    found = bench.score_studies(load_vision_language_model(hlip_model), ["ct"], 2, 100000, "cpu")
    assert set(found) == {k for k, w in FINDINGS.items() if w.modality == "CT"}
    assert all(len(e["scores"]) == 2 for e in found.values())
    assert bench.auroc(np.array([0.1, 0.9, 0.4]), np.array([False, True, True])) == 1.0
    assert bench.auroc(np.array([0.5, 0.5]), np.array([False, True])) == 0.5


@pytest.mark.slow  # a torchrun launch of two processes
def test_two_process_ddp_run(tmp_path):
    vlp()
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "model_core.cli",
           "pretrain", "--data", "phantom-studies:ct", "--phantoms", "2", "--out", str(out), "--steps", "2",
           *HLIP, *RUN]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_config(out)["provenance"]["world_size"] == 2
