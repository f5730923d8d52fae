"""Bias, variance, cosine, time and memory of the gradient estimators against a known gradient.

    python scripts/estimator_diagnostics.py --problem linear_gaussian --samples 2000 --out diag.json
    python scripts/estimator_diagnostics.py --problem tiny_unet --samples 200 --out diag_tiny.json
    python scripts/estimator_diagnostics.py --problem toy --estimators truncated_bp_k1,draft_lv_n2 --no-sweeps

linear_gaussian: the chain of ESTIMATORS.md (T = 12, sigma 0.6 -> 0.05), exact grad J in closed form.
tiny_unet: main's tiny SD-shaped pipeline (LoRA r=2, DDIM eta 1, 16 px, T = 6, batch 8, saturation
reward); the reference is the mean of `samples` further full-backprop gradients (its noise enters the
SE), and the bias is also given along the reference's direction (rel_bias_v, checks.projected_bias).
toy: the trained toy world (model=toy, T = 20, eta 1, CFG 4, batch 8, toy_aesthetic), reference as tiny_unet.
DRaFT-LV needs a forward process to re-noise x_0, which the linear-Gaussian chain has not: its rows
(draft_lv_n1/2/4) are on the other two problems.
Prints a markdown table, writes the JSON, and (unless --no-sweeps) sweeps RLR's variance against h and the peak memory of
full_bp / truncated_bp / rlr against T, with PNG plots next to the JSON.
Statistics: rlr_cli/estimators/checks.py. Peak memory: torch.cuda.max_memory_allocated on CUDA; on CPU
the peak bytes of tensors saved for backward (autograd saved-tensor hooks), gradient checkpointing off.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlr_cli.build import component  # noqa: E402
from rlr_cli.estimators.checks import bias_statistics, draw_estimates, flat_gradient, projected_bias  # noqa: E402
from rlr_cli.estimators.linear_gaussian import LinearGaussianPolicy, default_problem  # noqa: E402

MEMORY_NOTE = {
    True: "peak MB: torch.cuda.max_memory_allocated",
    False: "peak MB: peak bytes saved for backward (autograd saved-tensor hooks), no gradient checkpointing",
}


TOY_PROMPTS = ["a large red circle on a white background", "a small blue square on a black background",
               "a large green triangle on a gray background", "a small yellow cross on a brown background"] * 2


def ddpo_on_policy(batch: int, advantages: str = "leave_one_out"):
    """DDPO with one inner epoch and no clipping, in the units of grad J: the on-policy likelihood ratio."""
    return component("estimator=ddpo", "estimator.num_inner_epochs=1", f"estimator.train_batch_size={batch}",
                     "estimator.grad_accum=1", "estimator.clip_range=null", f"estimator.advantages={advantages}",
                     "estimator.log_prob_reduce=sum", "estimator.timestep_reduce=sum", f"trainer.batch_size={batch}")


def rlr(h: int, fo_steps: int = 1, *overrides: str):
    """RLR with the published fo_steps 1 and leave-one-out baseline unless given (a later value wins)."""
    return component("estimator=rlr", f"estimator.h={h}", f"estimator.fo_steps={fo_steps}",
                     "estimator.baseline=leave_one_out_prompt", *overrides)


def estimators(batch: int, num_steps: int, forward_process: bool) -> dict:
    """name -> factory of every estimator the table compares."""
    table = {
        "full_bp": lambda: component("estimator=full_bp"),
        "truncated_bp_k1": lambda: component("estimator=truncated_bp", "estimator.k=1"),
        "ddpo_onpolicy": lambda: ddpo_on_policy(batch),
        "ddpo_onpolicy_state": lambda: ddpo_on_policy(batch, "state"),
    }
    if forward_process:
        for n in (1, 2, 4):
            table[f"draft_lv_n{n}"] = lambda n=n: component("estimator=draft_lv", f"estimator.n={n}")
    state = ("estimator.baseline=state",)
    rlr_table = {"rlr_h1": (1, 1, ()), "rlr_h2": (2, 1, ()), "rlr_h4": (4, 1, ()),
                 "rlr_h2_param": (2, 1, ("estimator.zo.mode=param",)), "rlr_h1_k2": (1, 2, ()), "rlr_h1_k4": (1, 4, ()),
                 "rlr_h1_state": (1, 1, state), "rlr_h1_state_every3": (1, 1, (*state, "estimator.baseline_every=3")),
                 "rlr_h2_state": (2, 1, state), "rlr_h1_k3_state": (1, 3, state),
                 "rlr_h2_j_grad_norm": (2, 1, ("estimator.j=grad_norm",)),
                 "rlr_h2_k3_state": (2, 3, state),
                 "rlr_h2_k3_state_j_grad_norm": (2, 3, (*state, "estimator.j=grad_norm")),
                 "rlr_h2_step_param": (2, 1, ("estimator.zo.mode=step_param",))}
    for name, (h, k, extra) in rlr_table.items():
        if h + k <= num_steps:
            table[name] = lambda h=h, k=k, extra=extra: rlr(h, k, *extra)
    return table


def tiny_policy(num_steps: int, device: str):
    return component("model=tiny", f"model.num_steps={num_steps}", "model.eta=1.0", "model.guidance_scale=1.0",
                     "model.resolution=16", "model.gradient_checkpointing=false", "model.lora.rank=2",
                     "model.lora.alpha=2").to(device)


def make_problem(name: str, num_steps: int | None, device: str):
    """(policy, reward, prompts, exact gradient or None)."""
    if name == "linear_gaussian":
        policy, reward = default_problem()
        if num_steps is not None:
            policy = LinearGaussianPolicy(num_steps=num_steps)
        exact = torch.cat([g.flatten() for g in policy.exact_gradient(reward)])
        return policy, reward, ["a", "b", "c", "d"] * 2, exact
    if name == "toy":
        policy = component("model=toy", f"model.num_steps={num_steps or 20}", "model.eta=1.0", "model.guidance_scale=4.0")
        return policy.to(device), component("reward=toy_aesthetic"), TOY_PROMPTS, None  # the reward follows the images
    from rewards.simple import Saturation

    return tiny_policy(num_steps or 6, device), Saturation(), ["a red circle", "a blue square"] * 4, None


def markdown(rows: dict, header: str) -> str:
    cols = ["rel_bias", "rel_bias_se", "bias/se", "variance", "variance_se", "cosine", "seconds", "peak_mem_mb"]
    if any("rel_bias_v" in r for r in rows.values()):
        cols += ["rel_bias_v", "rel_bias_v_se"]
    rows = {name: dict(r) for name, r in rows.items()}  # the ratio columns stay out of the caller's rows
    for against in ("rlr_h1", "full_bp"):  # variance as a multiple of RLR as published's, and of full backprop's
        if against in rows:
            cols.append(f"var/{against}")
            for r in rows.values():
                r[f"var/{against}"] = r["variance"] / rows[against]["variance"]
    lines = [header, "", "| estimator | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        r = r | {"bias/se": r["rel_bias"] / r["rel_bias_se"] if r["rel_bias_se"] > 0 else float("nan")}
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.4g}" for c in cols) + " |")
    lines += ["", "rel_bias on the first N/16, N/4, N estimates (shrinks ~1/sqrt(N) = 4x per column when unbiased):", ""]
    for name, r in rows.items():
        lines.append(f"- {name}: " + ", ".join(f"N={m}: {v:.3g}" for m, v in r["rel_bias_by_n"].items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--problem", choices=["linear_gaussian", "tiny_unet", "toy"], default="linear_gaussian")
    parser.add_argument("--estimators", default="", help="comma-separated rows of the table (default: all)")
    parser.add_argument("--no-sweeps", action="store_true", help="the table only: no RLR h sweep, no memory sweep")
    parser.add_argument("--samples", type=int, default=2000, help="independent estimates per estimator")
    parser.add_argument("--out", default="estimator_diagnostics.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sweep-h", default="1,2,3,4,6,8", help="h values of the RLR variance sweep")
    parser.add_argument("--sweep-steps", default="10,20,50", help="T values of the memory sweep")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the machines here are shared; one thread per process
    cuda = args.device.startswith("cuda")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    # ---- bias / variance table ------------------------------------------------------------------
    policy, reward, prompts, exact = make_problem(args.problem, None, args.device)
    table = estimators(len(prompts), policy.num_steps, forward_process=args.problem != "linear_gaussian")
    chosen = args.estimators.split(",") if args.estimators else list(table)
    unknown = sorted(set(chosen) - set(table))
    if unknown:
        parser.error(f"--estimators: unknown {unknown}; this problem has {list(table)}")
    if not args.no_sweeps and "ddpo_onpolicy" not in chosen:
        parser.error("the RLR sweep is read against ddpo_onpolicy: add it to --estimators, or pass --no-sweeps")
    reference, rows = None, {}
    if exact is None:
        reference, _, _ = draw_estimates(component("estimator=full_bp"), policy, reward, prompts, args.samples,
                                         seed=args.seed + 99)
        exact = reference.mean(dim=0)
    for name in chosen:
        estimator = table[name]()
        estimates, seconds, _ = draw_estimates(estimator, policy, reward, prompts, args.samples, seed=args.seed)
        _, _, peak = draw_estimates(estimator, policy, reward, prompts, 1, seed=args.seed, meter=True)
        rows[name] = bias_statistics(estimates, exact, reference) | {"seconds": seconds, "peak_mem_mb": peak}
        if reference is not None:
            rows[name] |= projected_bias(estimates, reference)
        # an unbiased estimator's rel_bias shrinks like 1/sqrt(N); a bias does not
        rows[name]["rel_bias_by_n"] = {
            str(m): bias_statistics(estimates[:m], exact, reference)["rel_bias"]
            for m in (args.samples // 16, args.samples // 4, args.samples) if m >= 2
        }
        print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
    header = (f"**{args.problem}**, N = {args.samples} estimates of batch {len(prompts)}, T = {policy.num_steps}; "
              f"{MEMORY_NOTE[cuda]}; SE = sqrt(tr Cov / N (+ reference's)) / ||g||")
    print(markdown(rows, header))

    renoise = None
    if any(name.startswith("draft_lv") for name in chosen):
        renoise = renoise_variance(policy, reward, prompts, batches=4, draws=max(args.samples // 10, 5), seed=args.seed + 7)
        k1 = rows.get("truncated_bp_k1")
        share = f" = {renoise / k1['variance']:.2%} of truncated_bp_k1's" if k1 else ""
        print(f"\nDRaFT-LV: variance across re-noisings of one fixed batch (n = 1) {renoise:.4g}{share}; averaging n "
              "re-noisings removes 1 - 1/n of this part alone")
    variance_h, memory_t, plots = {}, {}, []
    if not args.no_sweeps:
        variance_h, memory_t = sweeps(args, policy, reward, prompts, exact, reference, rows["ddpo_onpolicy"]["variance"])
        plots = _plots(out, variance_h, rows["ddpo_onpolicy"]["variance"], memory_t, args.problem)
    result = {
        "problem": args.problem,
        "samples": args.samples,
        "batch": len(prompts),
        "num_steps": policy.num_steps,
        "memory": MEMORY_NOTE[cuda],
        "estimators": rows,
        "draft_lv_renoise_variance": renoise,
        "rlr_variance_vs_h": {str(h): s for h, s in variance_h.items()},
        "peak_mem_mb_vs_T": {name: {str(t): v for t, v in by_t.items()} for name, by_t in memory_t.items()},
        "plots": plots,
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}" + (f" and {', '.join(plots)}" if plots else ""), file=sys.stderr)


def renoise_variance(policy, reward, prompts, batches: int, draws: int, seed: int) -> float:
    """The variance of DRaFT-LV (n = 1) estimates across re-noisings of one fixed sampled batch, averaged
    over `batches` batches: the only part of the variance that DRaFT-LV's averaging acts on."""
    lv = component("estimator=draft_lv", "estimator.n=1")
    params = policy.trainable_parameters()
    generator = torch.Generator().manual_seed(seed)
    variances = []
    for _ in range(batches):
        with torch.no_grad():
            rollout = policy.sample(prompts, generator=generator)
        grads = []
        for _ in range(draws):
            for p in params:
                p.grad = None
            lv.renoised(policy, reward, rollout, generator, lambda term: term.backward())
            grads.append(flat_gradient(params))
        variances.append(torch.stack(grads).var(dim=0).sum())
    return float(torch.stack(variances).mean())


def sweeps(args, policy, reward, prompts, exact, reference, ddpo_var: float) -> tuple[dict, dict]:
    """RLR's variance against h, and peak memory of full_bp / truncated_bp / rlr against T (printed)."""
    # RLR variance against h
    sweep_n = max(args.samples // 2, 20)
    h_values = [h for h in map(int, args.sweep_h.split(",")) if h + 1 <= policy.num_steps]
    variance_h = {}
    for h in h_values:
        estimates, _, _ = draw_estimates(rlr(h), policy, reward, prompts, sweep_n, seed=args.seed + h)
        variance_h[h] = bias_statistics(estimates, exact, reference)
    print(f"\nRLR variance against h (N = {sweep_n}; ddpo_onpolicy: {ddpo_var:.4g})\n\n"
          "| h | variance | ratio to ddpo_onpolicy | rel_bias | rel_bias_se |\n|---|---|---|---|---|")
    for h, s in variance_h.items():
        print(f"| {h} | {s['variance']:.4g} | {s['variance'] / ddpo_var:.3f} | {s['rel_bias']:.3g} | {s['rel_bias_se']:.3g} |")

    # peak memory against T
    memory_t: dict[str, dict[int, float]] = {"full_bp": {}, "truncated_bp_k1": {}, "rlr_h1": {}, "rlr_h4": {}}
    steps = list(map(int, args.sweep_steps.split(",")))
    for t in steps:
        pol_t, rew_t, prompts_t, _ = make_problem(args.problem, t, args.device)
        for name, est in [("full_bp", component("estimator=full_bp")),
                          ("truncated_bp_k1", component("estimator=truncated_bp", "estimator.k=1")),
                          ("rlr_h1", rlr(1)), ("rlr_h4", rlr(4))]:
            memory_t[name][t] = draw_estimates(est, pol_t, rew_t, prompts_t, 1, seed=args.seed, meter=True)[2]
    note = MEMORY_NOTE[args.device.startswith("cuda")]
    print(f"\nPeak memory (MB) against T ({note})\n\n| estimator | " + " | ".join(f"T={t}" for t in steps)
          + " |\n|---" * 1 + "|---" * len(steps) + "|")
    for name, by_t in memory_t.items():
        print(f"| {name} | " + " | ".join(f"{by_t[t]:.4g}" for t in steps) + " |")
    return variance_h, memory_t


def _plots(out: Path, variance_h: dict, ddpo_var: float, memory_t: dict, problem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [str(out.with_suffix("")) + "_variance_vs_h.png", str(out.with_suffix("")) + "_memory_vs_T.png"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(list(variance_h), [s["variance"] for s in variance_h.values()], "o-", label="rlr (fo_steps 1)")
    ax.axhline(ddpo_var, color="gray", ls="--", label="ddpo on-policy")
    ax.set(xlabel="h (HO sub-chain length)", ylabel="total variance", yscale="log", title=f"RLR variance vs h ({problem})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, by_t in memory_t.items():
        ax.plot(list(by_t), list(by_t.values()), "o-", label=name)
    ax.set(xlabel="T (sampling steps)", ylabel="peak MB", title=f"Peak memory vs T ({problem})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close("all")
    return paths


if __name__ == "__main__":
    main()
