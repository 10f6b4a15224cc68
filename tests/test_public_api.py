"""The public API, pinned (docs/design.md §2–3): the front door and every subpackage list their
names explicitly, so growing or shrinking the API is a visible diff here; each name has one
home (no module re-exports a sibling's name); every name of the design's contract resolves
where the design says; ``import cdp_fast`` is cheap and works under ``python -OO``."""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import cdp_fast

ROOT = Path(__file__).resolve().parents[1]

FRONT_DOOR = [
    "ContrastiveGuidance", "Samples", "SigmaDenoiser", "data", "diffusion", "evaluate", "guidance",
    "guided_ddim", "guided_ddpm", "guided_dpmpp_2m", "guided_heun", "karras_sigmas", "label", "losses",
    "make_alphas_cumprod", "metrics", "models", "ops", "pgd_step", "pseudo_label", "robust", "sample",
    "sampling", "select", "theory", "timesteps", "train_diffusion", "train_pgd_at", "train_trades", "__version__",
]

SUBPACKAGES = {
    "cdp_fast.utils": [],
    "cdp_fast.ops": [],
    "cdp_fast.ops.contrastive": ["contrastive_stats", "contrastive_stats_backward", "contrastive_loss",
                                 "rows_from_stats", "IMPLS"],
    "cdp_fast.ops.ddim": ["ddim_update", "ddim_update_ref", "ddim_update_op", "ddpm_update", "coefficients",
                          "IMPLS"],
    "cdp_fast.ops.pgd_step": ["pgd_step", "pgd_step_ref", "load_extension", "extension_available",
                              "extension_error", "resolved_impl", "check_scalar_or_per_sample"],
    "cdp_fast.models": ["WideResNet", "wrn_28_10", "PreActResNet", "preact_resnet18", "SmallCNN", "small_cnn",
                        "MnistNet", "mnist_net", "Normalize", "CIFAR10_MEAN", "CIFAR10_STD", "get_model", "as_feature_extractor",
                        "FeatureExtractor", "MODEL_NAMES", "as_labeler", "Labeler", "load_wrn_checkpoint",
                        "load_checkpoint_into", "published_state_dict"],
    "cdp_fast.data": ["Samples", "as_source", "BatchSource", "open_images", "ImageSource", "check_unit_range",
                      "images_to_float01", "to_uint8_nhwc", "load_cifar10", "load_mnist_5k", "mnist_split",
                      "MnistSplit", "write_npz", "npz_bytes", "shard_intact"],
    "cdp_fast.diffusion": ["EpsModel", "SigmaDenoiser", "EpsFromPrediction", "timesteps", "make_alphas_cumprod", "karras_sigmas",
                           "SOLVERS", "guided_ddim", "guided_ddpm", "guided_dpmpp_2m", "guided_heun",
                           "train_diffusion"],
    "cdp_fast.guidance": ["ContrastiveGuidance", "MLPHead", "PAPER_DEFAULTS", "hnm_loss", "infonce_loss"],
    "cdp_fast.sampling": ["sample"],
    "cdp_fast.robust": ["train_trades", "train_pgd_at", "evaluate", "pgd_attack", "trades_attack", "RECIPES",
                        "pgd_step_l2", "holdout_split"],
    "cdp_fast.label": ["pseudo_label", "pseudo_label_to_npz", "select", "scores", "per_sample_grad_norm",
                       "attack_generator", "CRITERIA"],
    "cdp_fast.metrics": ["ImageSet", "as_image_set", "PCAFeatures", "fit_pca", "extract_features",
                         "class_separation", "effective_c", "knn_radii", "prdc", "class_balance", "label_agreement",
                         "confidence_summary", "fit_logistic_regression", "linear_probe", "nn_distances",
                         "memorisation", "paired", "report", "table_rows", "figure", "METRIC_DEFAULTS",
                         "FeatureStats", "feature_stats", "frechet_distance", "kernel_distance", "fid"],
    "cdp_fast.theory": ["Q", "err_standard", "err_robust", "hard_threshold", "robust_optimal_theta", "make_mu",
                        "synthetic_mean", "self_training", "simulate", "draw_holdout", "holdout_accuracy",
                        "holdout_sd", "PCAMixtureEps", "fit_pca_mixture"],
    "cdp_fast.cli": ["main", "build_parser"],
    "cdp_fast.demo": ["run_demo", "format_table", "format_metrics_table", "format_sweep_table", "ARMS", "LAMS",
                      "LEAKAGE", "DEFAULTS", "FULL", "BUDGET_NOTE"],
}


def test_front_door_is_the_listed_names():
    assert cdp_fast.__all__ == sorted(FRONT_DOOR[:-1]) + ["__version__"]
    assert sorted(dir(cdp_fast)) == sorted(FRONT_DOOR)
    assert cdp_fast.__version__ == "0.2.0"
    for name in FRONT_DOOR:
        assert getattr(cdp_fast, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'backend'"):
        cdp_fast.backend    # internals are reached by their full paths


@pytest.mark.parametrize("package", sorted(SUBPACKAGES))
def test_subpackage_exports_are_the_listed_names(package):
    mod = importlib.import_module(package)
    assert list(mod.__all__) == SUBPACKAGES[package]
    for name in mod.__all__:
        assert hasattr(mod, name), f"{package}.__all__ names {name}, which it does not define"


def _defined_at_top(tree):
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                names |= {e.id for e in (t.elts if isinstance(t, ast.Tuple) else [t]) if isinstance(e, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def _all_of(tree):
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return ast.literal_eval(node.value)
    return None


def test_no_module_reexports_a_siblings_name():
    """Outside package ``__init__`` files (which list their subpackage's public names), every
    name in a module's ``__all__`` is defined in that module: each name has one home."""
    bad = []
    for path in sorted((ROOT / "cdp_fast").rglob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        names = _all_of(tree)
        if names is None:
            continue
        bad += [f"{path.relative_to(ROOT)}: {n}" for n in sorted(set(names) - _defined_at_top(tree))]
    assert not bad, "re-exported names (import them from their home instead):\n" + "\n".join(bad)


def test_the_design_contract_resolves_where_the_design_says():
    """docs/design.md §3's names."""
    import cdp_fast.label
    import cdp_fast.theory

    for name in ("sample", "Samples", "guided_ddim", "guided_ddpm", "guided_dpmpp_2m", "guided_heun",
                 "ContrastiveGuidance", "SigmaDenoiser", "timesteps", "make_alphas_cumprod", "karras_sigmas",
                 "pgd_step", "train_trades", "train_pgd_at", "train_diffusion", "evaluate", "pseudo_label",
                 "select"):
        assert callable(getattr(cdp_fast, name)), name
    assert callable(cdp_fast.Samples.load)
    assert cdp_fast.losses.hnm_loss is cdp_fast.guidance.hnm_loss
    assert cdp_fast.losses.infonce_loss is cdp_fast.guidance.infonce_loss
    assert cdp_fast.label.pseudo_label is cdp_fast.pseudo_label and cdp_fast.label.select is cdp_fast.select
    for name in ("err_standard", "err_robust", "simulate"):
        assert callable(getattr(cdp_fast.theory, name))
    assert callable(cdp_fast.models.as_feature_extractor) and callable(cdp_fast.models.get_model)


def test_import_is_cheap_and_works_without_docstrings():
    """``import cdp_fast`` imports no subpackage, Triton or compiler; ``-OO`` strips docstrings
    and everything still imports (nothing reads ``__doc__`` at import)."""
    code = ("import sys, cdp_fast\n"
            "assert not any(m.startswith(('cdp_fast.', 'triton')) for m in sys.modules), sorted(sys.modules)\n"
            "import cdp_fast.sampling, cdp_fast.robust, cdp_fast.metrics, cdp_fast.label, cdp_fast.theory\n"
            "import cdp_fast.cli, cdp_fast.demo, cdp_fast.data, cdp_fast.ops.pgd_step, cdp_fast.ops.contrastive\n"
            "cdp_fast.sample, cdp_fast.evaluate, cdp_fast.train_trades\n")
    res = subprocess.run([sys.executable, "-OO", "-c", code], capture_output=True, text=True, cwd=str(ROOT),
                         timeout=300)
    assert res.returncode == 0, res.stderr
