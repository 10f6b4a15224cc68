"""The pipeline of `cdp-fast demo` (:func:`cdp_fast.demo.run_demo`), stage by stage: set-up
(the k real digits, the labeller, the guidance network, the independent instruments), the λ
rule on the sweep seed, the synthetic sets and their §1 metrics per seed, the arms' training
per seed, the Gaussian chain, and the results dict (:class:`Run`). The docstring of
:mod:`cdp_fast.demo` says what is measured and why; :mod:`cdp_fast.demo.digits` holds the
pieces, :mod:`cdp_fast.demo.outputs` writes the files (results.json, the plot, the sample grids).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

import cdp_fast.demo.digits as dd
from cdp_fast.robust.evaluation import ATTACKS
from cdp_fast.demo.config import ARMS, BUDGET_NOTE, DEFAULTS, FULL, LAMS, LEAKAGE, QUICK_AA
from cdp_fast.demo.outputs import machine_info, write_json, write_outputs
from cdp_fast.demo.stats import paired_ci, summarise
from cdp_fast.demo.tables import (format_gaussian_table, format_metrics_table, format_sweep_table, format_table,
                                  metrics_summary)
from cdp_fast.utils.checks import check_number

__all__ = ["Run"]


def _int(name, v, lo):
    check_number(name, v, lo=lo, integer=True)
    return int(v)


class Run:
    """One demo run; ``opts`` are :func:`cdp_fast.demo.run_demo`'s arguments."""

    def __init__(self, opts: dict):
        full = bool(opts["full"])
        d = dict(DEFAULTS, **(FULL if full else {}))
        o = {k: (d[k] if opts.get(k) is None and k in d else opts.get(k)) for k in set(d) | set(opts)}
        seeds = list(range(d["seeds"])) if opts["seeds"] is None else list(opts["seeds"])
        if not seeds or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in seeds):
            raise ValueError(f"seeds must be a non-empty list of non-negative ints, got {opts['seeds']!r}")
        if len(set(seeds)) != len(seeds) or o["sweep_seed"] in seeds:
            raise ValueError(f"seeds must be distinct and differ from the sweep seed {o['sweep_seed']}, got {seeds!r}")
        o["seeds"] = [int(s) for s in seeds]
        for name, lo in (("k_per_class", 1), ("n_synthetic", 8), ("epochs", 1), ("updates_per_epoch", 1),
                         ("batch_size", 2), ("pgd_steps", 1), ("sampling_steps", 1), ("sweep_n", 8),
                         ("labeler_steps", 1), ("guide_updates", 1), ("curve_n", 1), ("gaussian_seeds", 1), ("width", 1), ("aa_n", 0)):
            o[name] = _int(name, o[name], lo)
        if o["test_n"] is not None:
            o["test_n"] = _int("test_n", o["test_n"], 1)
        if not (isinstance(o["eps"], (int, float)) and 0 <= o["eps"] <= 1):
            raise ValueError(f"eps must lie in [0, 1], got {o['eps']!r}")
        if not (isinstance(o["real_fraction"], (int, float)) and 0 < o["real_fraction"] < 1):
            raise ValueError(f"real_fraction must lie in (0, 1), got {o['real_fraction']!r}")
        o["attacks"] = tuple(o["attacks"])
        if not o["attacks"] or any(a not in ATTACKS for a in o["attacks"]):
            raise ValueError(f"attacks must be a non-empty subset of {ATTACKS}, got {o['attacks']!r}")
        arms = tuple(ARMS if o["arms"] is None else o["arms"])
        if not arms or any(a not in ARMS for a in arms):
            raise ValueError(f"arms must be a non-empty subset of {ARMS}, got {arms!r}")
        o["arms"] = tuple(a for a in ARMS if a in arms or a == "real+ddim")   # the reference always runs
        o["lams"] = tuple(float(v) for v in (LAMS if o["lams"] is None else o["lams"]))
        if not o["lams"] or any(not np.isfinite(v) or v <= 0 for v in o["lams"]):
            raise ValueError(f"lams must be positive numbers, got {opts['lams']!r}")
        o["sweep_n"] = min(o["sweep_n"], o["n_synthetic"])
        self.o = o
        self.kinds = ["ddim"] + [k for k, arms_k in (("cdp", ("real+cdp", "syn-only")), ("cdp-class", ("real+cdp-class",)))
                                 if any(a in o["arms"] for a in arms_k)]
        self.dev = torch.device(o["device"]) if o["device"] is not None else torch.device("cpu")
        self.out = None if o["out"] is None else Path(o["out"])
        self.timing = {}
        self.cb = o["callback"] or (lambda ev: None)

    # --------------------------------------------------------------------- stages
    def execute(self) -> dict:
        t0 = time.time()
        for stage in (self.setup, self.sweep, self.generate, self.train, self.gaussian):
            t = time.time()
            stage()
            self.timing[stage.__name__] = time.time() - t
        self.timing["total"] = time.time() - t0
        return self.results()

    def execute_gaussian_only(self) -> dict:
        """The Gaussian chain alone (``run_demo(digits=False)``): results.json with it."""
        t0 = time.time()
        self.gaussian()
        self.timing["gaussian"] = self.timing["total"] = time.time() - t0
        res = {"config": {"parts": ["gaussian"], "gaussian_seeds": self.o["gaussian_seeds"], "full": self.o["full"]},
               "gaussian": self.gauss, "timing_s": self.timing, "machine": machine_info(),
               "gaussian_table": "\n\n".join(format_gaussian_table(g) for g in self.gauss.values()),
               "files": {}}
        if self.out is not None:
            res["files"]["json"] = str(self.out / "results.json")
            write_json(res, self.out / "results.json")
        return res

    def setup(self):
        import cdp_fast
        from cdp_fast.models import as_feature_extractor, digits

        o = self.o
        self.xk, self.yk, self.idx = dd.choose_real(o["k_per_class"], seed=0)
        x_te, y_te = digits.load_digits_data("test")
        n_te = len(x_te) if o["test_n"] is None else min(o["test_n"], len(x_te))
        self.x_te, self.y_te = x_te[:n_te], y_te[:n_te]
        self.curve_n = min(o["curve_n"], n_te)
        self.aa_n = n_te if o["aa_n"] == 0 else min(o["aa_n"], n_te)
        self.eps_model = digits.load_digits_eps_model(self.dev)
        clf = dd.train_labeler(self.xk, self.yk, steps=o["labeler_steps"], seed=0)
        self.labeler = digits.DigitsLabeler(clf).eval().to(self.dev)
        gnet = dd.train_guidance_net(self.xk, self.yk, updates=o["guide_updates"], eps=o["eps"], seed=0,
                                     device=self.dev)
        self.features = as_feature_extractor(gnet).eval()
        x_tr, y_tr = digits.load_digits_data("train")
        judge, judge_desc = dd.fit_independent_classifier((x_tr, y_tr))
        self.inst = dd.Instruments(self.xk, self.yk, judge=judge)
        if len({id(clf), id(gnet), id(judge)}) != 3:   # never one network in two roles
            raise RuntimeError("the labeler, the guidance network and the judge must be distinct objects")
        g_acc = cdp_fast.evaluate(gnet, self.x_te, self.y_te, eps=o["eps"], attacks=("clean", "pgd"))
        with torch.no_grad():
            lab_acc = float((clf(self.x_te).argmax(1) == self.y_te).double().mean())
            judge_acc = float((judge(self.x_te).argmax(1) == self.y_te).double().mean())
        self.networks = {
            "labeler": {"role": "pseudo-labels of every synthetic set and the classes of cdp-class guidance",
                        "arch": "cdp_fast.models.digits.DigitsClassifier (fresh init, seed 0)",
                        "trained_on": f"the k real digits only ({len(self.xk)})",
                        "training": f"cross-entropy, Adam lr 1e-3, {o['labeler_steps']} full-batch steps, random "
                                    "crops (pad 1)", "test_accuracy": lab_acc},
            "guidance": {"role": "guidance features (as_feature_extractor: [-1, 1] -> [0, 1] -> .features)",
                         "arch": "cdp_fast.models.small_cnn(num_classes=10) (width 32, 128-d features)",
                         "trained_on": f"the k real digits only ({len(self.xk)})",
                         "training": f"cdp_fast.train_trades, recipe gowal, eps {o['eps']:g}, 5 PGD steps, "
                                     f"{o['guide_updates']} updates, lr 0.05", "test_clean": g_acc["clean"],
                         "test_pgd20": g_acc["pgd"]},
            "judge": {"role": "label agreement in the section-1 metrics only (a measuring instrument)",
                      "description": judge_desc, "trained_on": f"the whole training split ({len(x_tr)}); no arm "
                                                               "trains on it", "test_accuracy": judge_acc},
            "features_for_metrics": f"PCA of the k real digits ({self.inst.pca.dim} components), cdp_fast.metrics",
            "arms": f"a fresh cdp_fast.models.small_cnn(num_classes=10, width={o['width']}) per arm and seed",
            "distinct_objects": True}
        self.cb({"stage": "setup", "networks": self.networks})

    def _set(self, kind, n, seed, lam=None, progress=False):
        return dd.generate_set(kind, n, seed=seed, eps_model=self.eps_model, labeler=self.labeler,
                               features=self.features, lam=lam, tau=self.o["tau"], steps=self.o["sampling_steps"],
                               device=self.dev, progress=progress)

    def sweep(self):
        o = self.o
        seed, n = o["sweep_seed"], o["sweep_n"]
        ddim = self._set("ddim", n, seed)
        ddim_row = dict(kind="ddim", lam=0.0, **dd.quick_metrics(ddim, self.inst))
        rows, self.lam = [ddim_row], {}
        choice = {}
        for kind in self.kinds[1:]:
            krows = []
            for lam in o["lams"]:
                s = self._set(kind, n, seed, lam=lam)
                krows.append(dict(kind=kind, lam=lam, **dd.quick_metrics(s, self.inst, against=ddim)))
                self.cb({"stage": "sweep", "row": krows[-1]})
            choice[kind] = dd.select_lambda(krows, ddim_row, tol=0.05, key="fisher_ratio")
            self.lam[kind] = choice[kind]["lam"]
            rows += krows
        self.sweep_result = {"seed": seed, "n": n, "tau": o["tau"], "rows": rows, "choice": choice,
                             "rule": "before any training, per guided kind (cdp-class by the same rule, its own "
                                     "lambda): among the lambdas whose precision against the k real digits (PCA "
                                     "space, k=5) is >= DDIM's - 0.05, the largest Fisher ratio of the pseudo-"
                                     "labelled set in the PCA of the k real digits; ties -> smaller lambda; none "
                                     "-> the smallest lambda"}
        self.cb({"stage": "lambda", "choice": choice})

    def generate(self):
        o = self.o
        self.sets, self.reports = {}, {k: [] for k in self.kinds}
        t_metrics = 0.0
        for seed in o["seeds"]:
            for kind in self.kinds:
                s = self._set(kind, o["n_synthetic"], seed, lam=self.lam.get(kind), progress=o["progress"])
                self.sets[(kind, seed)] = s
            if o["metrics"]:
                t = time.time()
                for kind in self.kinds:
                    rep = dd.set_report(self.sets[(kind, seed)], self.inst, test=(self.x_te, self.y_te), eps=o["eps"],
                                        against=None if kind == "ddim" else self.sets[("ddim", seed)])
                    self.reports[kind].append(rep)
                t_metrics += time.time() - t
            self.cb({"stage": "generated", "seed": seed,
                     "labels": {k: np.bincount(np.asarray(self.sets[(k, seed)].labels), minlength=10).tolist()
                                for k in self.kinds}})
        self.timing["metrics"] = t_metrics

    def _arm_data(self, arm, seed):
        def tensors(kind):
            s = self.sets[(kind, seed)]
            return s.to_tensor(), torch.as_tensor(np.asarray(s.labels), dtype=torch.int64)
        if arm == "real":
            return (self.xk, self.yk), None
        if arm == "syn-only":
            return tensors("cdp"), None
        return (self.xk, self.yk), tensors(arm.split("+", 1)[1])

    def train(self):
        import cdp_fast
        from cdp_fast.models import small_cnn

        o = self.o
        aa = {} if o["full"] else {"version": "custom", "aa_attacks": QUICK_AA}
        self.acc = {a: {k: [] for k in o["attacks"]} for a in o["arms"]}
        self.curves = {a: [] for a in o["arms"]}
        xc, yc = self.x_te[:self.curve_n], self.y_te[:self.curve_n]
        for seed in o["seeds"]:
            for arm in o["arms"]:
                data, syn = self._arm_data(arm, seed)
                points = []

                def curve(ev, points=points):
                    r = cdp_fast.evaluate(ev["ema_model"], xc, yc, eps=o["eps"], attacks=("clean", "pgd"))
                    points.append({"updates": ev["epoch"] * o["updates_per_epoch"], "clean": r["clean"],
                                   "pgd": r["pgd"]})
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    model = small_cnn(num_classes=10, width=o["width"])
                model = cdp_fast.train_trades(
                    model, data, synthetic=syn, real_fraction=o["real_fraction"], epochs=o["epochs"],
                    steps_per_epoch=o["updates_per_epoch"], eps=o["eps"], step_size=2.5 * o["eps"] / o["pgd_steps"],
                    steps=o["pgd_steps"], batch_size=o["batch_size"], lr=o["lr"], warmup_epochs=1, seed=seed,
                    device=self.dev, progress=False, callback=curve)
                first = tuple(k for k in o["attacks"] if k != "autoattack")
                res = cdp_fast.evaluate(model, self.x_te.to(self.dev), self.y_te.to(self.dev), eps=o["eps"],
                                        attacks=first) if first else {}
                if "autoattack" in o["attacks"]:
                    res.update(cdp_fast.evaluate(model, self.x_te[:self.aa_n].to(self.dev),
                                                 self.y_te[:self.aa_n].to(self.dev), eps=o["eps"],
                                                 attacks=("autoattack",), **aa))
                for k in o["attacks"]:
                    self.acc[arm][k].append(float(res[k]))
                self.curves[arm].append({"seed": seed, "points": points})
                self.cb({"stage": "trained", "arm": arm, "seed": seed, "result": {k: float(res[k]) for k in res}})

    def gaussian(self):
        self.gauss = None
        if self.o["gaussian"]:
            from cdp_fast.demo.gaussian import gaussian_settings

            self.gauss = gaussian_settings(seeds=list(range(self.o["gaussian_seeds"])), callback=self.cb)

    # --------------------------------------------------------------------- results
    def results(self) -> dict:
        o = self.o
        arms = {a: {k: summarise(v) for k, v in self.acc[a].items()} for a in o["arms"]}
        paired = {a: {k: paired_ci(self.acc[a][k], self.acc["real+ddim"][k]) for k in o["attacks"]}
                  for a in o["arms"] if a != "real+ddim"}
        mean_curves = {}
        for a, runs in self.curves.items():
            if runs and runs[0]["points"]:
                pts = runs[0]["points"]
                mean_curves[a] = [{"updates": p["updates"],
                                   "clean": float(np.mean([r["points"][i]["clean"] for r in runs])),
                                   "pgd": float(np.mean([r["points"][i]["pgd"] for r in runs]))}
                                  for i, p in enumerate(pts)]
        cfg = {k: v for k, v in o.items() if k not in ("callback", "out", "device", "progress")}
        cfg.update(parts=["digits"] + (["gaussian"] if o["gaussian"] else []),
                   updates=o["epochs"] * o["updates_per_epoch"], real_n=len(self.xk), test_n=len(self.x_te),
                   real_indices=self.idx.tolist(), real_subset_seed=0, leakage=LEAKAGE,
                   budget_note=BUDGET_NOTE,
                   lam=self.lam, class_lambda="its own, by the same rule on the same sweep seed",
                   syn_only="the cdp set (unconditional HNM, the authors' method) alone, no real images",
                   autoattack="+".join(QUICK_AA) if not o["full"] else "standard", aa_test_n=self.aa_n,
                   eval_pgd="PGD-20, step eps/4, random start (cdp_fast.evaluate)",
                   curve=f"clean and PGD-20 of the EMA model on the first {self.curve_n} test digits at every epoch "
                         "end",
                   sampling={"steps": o["sampling_steps"], "skip": "uniform", "eta": 0.0, "batch_size": 128,
                             "guidance": "loss hnm, tau 10, tau_plus 0.1, beta 1, form None (authors'), "
                                         "guide_window auto (t >= 0.4 T), embedding auto (online head)"},
                   training={"model": f"cdp_fast.models.small_cnn(num_classes=10, width={o['width']})",
                             "recipe": "gowal",
                             "pad_flip": "library defaults (pad 1, no flips)", "warmup_epochs": 1, "beta": 6.0,
                             "ema": 0.995, "lr": o["lr"]},
                   device=str(self.dev))
        res = {"config": cfg, "networks": self.networks, "lambda_sweep": self.sweep_result, "arms": arms,
               "paired_vs_ddim": paired, "curves": self.curves, "mean_curves": mean_curves,
               "gaussian": self.gauss, "timing_s": self.timing, "machine": machine_info()}
        if o["metrics"]:
            msum = metrics_summary(self.reports)
            res["metrics"] = {"summary": msum, "per_seed": self.reports}
            res["metrics_table"] = format_metrics_table(msum)
        res["table"] = format_table(res)
        res["sweep_table"] = format_sweep_table(self.sweep_result)
        if self.gauss is not None:
            res["gaussian_table"] = "\n\n".join(format_gaussian_table(g) for g in self.gauss.values())
        if self.out is not None:
            write_outputs(res, self.out, {k: self.sets[(k, o["seeds"][0])] for k in self.kinds})
        else:
            res["files"] = {}
        return res
