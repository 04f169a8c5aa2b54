"""The child-process side of ``experiments.pipelines.fairseq.stages``: one fairseq stage per process.

    python -m experiments.pipelines.fairseq.worker STAGE ARGS...

``train`` / ``generate`` / ``validate`` call fairseq's own ``cli_main`` with ARGS as their
command line; ``score_lm`` scores the test split as ``fairseq-eval-lm`` does (same options,
same data pipeline, fairseq's ``SequenceScorer``) but counts every token, exact zeros
included, and reports the ε-perplexity; ``dry_run`` builds fairseq's ``Trainer`` and times two
updates; ``check_args`` parses a run's command lines with fairseq's own parsers. Reports for the parent are single lines starting with :data:`REPORT_MARK`.

The process dies with its parent: the parent starts it as the leader of a new process group
and it asks the kernel for SIGTERM when the parent dies (``PR_SET_PDEATHSIG``), on which it
kills its whole group, fairseq's spawned GPU workers included. A non-finite loss ends it
with exit code :data:`experiments.core.errors.STOP_EXIT_CODE` and a report naming the update.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import sys
import threading
import time

from experiments.core.console import dry_run_report
from experiments.core.errors import INTERRUPTED_EXIT_CODE, STOP_EXIT_CODE

REPORT_MARK = "@multimax@ "  # the child's report lines, told apart from fairseq's own output
PARENT_PID_ENV = "MULTIMAX_PARENT_PID"
STAGES = ("train", "score_lm", "validate", "generate", "dry_run", "check_args", "preprocess")


def report(kind: str, payload) -> None:
    """One line for the parent: ``@multimax@ <kind> <JSON>``."""
    print(f"{REPORT_MARK}{kind} {json.dumps(payload, allow_nan=False)}", flush=True)


def parse_report(line: str) -> tuple[str, object] | None:
    """(kind, payload) of a report line, or None for any other line."""
    if not line.startswith(REPORT_MARK):
        return None
    kind, _, payload = line[len(REPORT_MARK) :].partition(" ")
    return kind, json.loads(payload)


def _report_text(text: str) -> None:
    for line in text.splitlines():
        report("text", line)


# --- dying with the parent ---------------------------------------------------------------------


def _kill_own_group(*_args) -> None:
    os.killpg(os.getpgrp(), signal.SIGKILL)


def die_with_parent() -> None:
    """Kill this process group (this stage and every process it started) when the parent dies."""
    parent = int(os.environ.get(PARENT_PID_ENV, "0") or 0)
    if not parent:
        return
    if os.getpgrp() == os.getpid():  # our own group: killing it cannot reach the parent
        signal.signal(signal.SIGTERM, _kill_own_group)  # the training stage saves instead
        signal.signal(signal.SIGHUP, _kill_own_group)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1  # SIGHUP: SIGTERM is the scheduler's "save and stop"
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGHUP)
    else:  # no parent-death signal: poll for the parent instead

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            _kill_own_group()

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        _kill_own_group()


# --- non-finite losses -----------------------------------------------------------------------------


def _updates_done() -> int | None:
    """The updates fairseq finished before the failing one (its ``num_updates`` meter)."""
    try:
        from fairseq.logging import metrics

        meter = metrics.get_meter("default", "num_updates")
        return None if meter is None else int(meter.val)
    except Exception:  # noqa: BLE001 - only used to name the update in a message
        return None


# --- SIGTERM / SIGUSR2: a checkpoint at the current update, then exit ------------------------------


def train_until_stop_signal(argv: list[str]) -> None:
    """``fairseq-train ARGV`` (fairseq's own parser and ``main``, as its ``cli_main`` runs
    them) in which SIGTERM / SIGUSR2 end training at the current update through fairseq's own
    stop: ``--stop-time-hours`` set to an instant, on which fairseq validates, saves
    ``checkpoint_last.pt`` with its data position and returns. Then a ``stopped`` report and
    exit code :data:`~experiments.core.errors.INTERRUPTED_EXIT_CODE`. (Within one process or
    torchrun's ranks; GPU workers fairseq spawns itself keep their copy of the setting.)"""
    from fairseq import distributed_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli.train import main as fairseq_train_main

    parser = options.get_training_parser()
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, input_args=argv))
    received: list[int] = []

    def stop_at_this_update(signum: int, _frame) -> None:
        received.append(signum)
        cfg.optimization.stop_time_hours = 1e-12

    for sig in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, stop_at_this_update)
    distributed_utils.call_main(cfg, fairseq_train_main)
    if received:
        report("stopped", {"signal": signal.Signals(received[0]).name, "updates": _updates_done()})
        sys.exit(INTERRUPTED_EXIT_CODE)


def _is_non_finite(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}"
    return "FloatingPointError" in text or "Minimum loss scale reached" in text


# --- score_lm: fairseq-eval-lm's scoring, every token counted ---------------------------------------


def _pop_option(argv: list[str], flag: str, default: float) -> tuple[float, list[str]]:
    """(value of ``flag VALUE`` in argv or ``default``, argv without it)."""
    if flag not in argv:
        return default, argv
    i = argv.index(flag)
    return float(argv[i + 1]), argv[:i] + argv[i + 2 :]


def score_lm(argv: list[str]) -> None:
    """``fairseq-eval-lm ARGS`` (context window, batching, checkpoint loading as fairseq does),
    reporting log-likelihood over *every* target token: ``loss_base2`` / ``perplexity``
    (infinite when some token got probability 0 — fairseq-eval-lm would silently skip it),
    the ε-perplexity (``--eps-perplexity-epsilon E``, our one option beside fairseq's) and
    the share of tokens with probability 0. ``--token-log-probs PATH`` keeps every scored
    token's log-probability there (``experiments.core.per_example``)."""
    import torch
    from fairseq import checkpoint_utils, options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.sequence_scorer import SequenceScorer

    from multimax.metrics import EPSILON_PERPLEXITY_DEFAULT, epsilon_log_likelihood

    epsilon, argv = _pop_option(argv, "--eps-perplexity-epsilon", EPSILON_PERPLEXITY_DEFAULT)
    record_path = None
    if "--token-log-probs" in argv:
        i = argv.index("--token-log-probs")
        record_path, argv = argv[i + 1], argv[:i] + argv[i + 2 :]
    parser = options.get_eval_lm_parser()
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, input_args=argv))
    utils.import_user_module(cfg.common)
    if cfg.eval_lm.context_window > 0:
        cfg.task.tokens_per_sample -= cfg.eval_lm.context_window
    task = tasks.setup_task(cfg.task)
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [cfg.common_eval.path], arg_overrides=eval(cfg.common_eval.model_overrides), task=task
    )
    use_cuda = torch.cuda.is_available() and not cfg.common.cpu
    for model in models:
        if cfg.common.fp16:
            model.half()
        if use_cuda:
            model.cuda()
        model.prepare_for_inference_(cfg)
    task.load_dataset(cfg.dataset.gen_subset)
    dataset = task.dataset(cfg.dataset.gen_subset)
    itr = task.eval_lm_dataloader(
        dataset=dataset,
        max_tokens=cfg.dataset.max_tokens or 36000,
        batch_size=cfg.dataset.batch_size,
        max_positions=utils.resolve_max_positions(*[m.max_positions() for m in models]),
        num_shards=1,
        shard_id=0,
        num_workers=cfg.dataset.num_workers,
        data_buffer_size=cfg.dataset.data_buffer_size,
        context_window=cfg.eval_lm.context_window,
    )
    scorer = SequenceScorer(task.target_dictionary, cfg.eval_lm.softmax_batch)
    remove_bos = getattr(cfg.task, "add_bos_token", False)
    vocab = len(task.target_dictionary)
    tokens, zeros, log_sum, eps_sum = 0, 0, 0.0, 0.0
    per_token = []
    start = time.perf_counter()
    for sample in itr:
        if "net_input" not in sample:
            continue
        sample = utils.move_to_cuda(sample) if use_cuda else sample
        for hypos in scorer.generate(models, sample):
            log_p = hypos[0]["positional_scores"].double()
            if remove_bos:
                log_p = log_p[1:]
            tokens += log_p.numel()
            per_token.append(log_p.float().cpu())
            zeros += int((log_p == float("-inf")).sum())
            log_sum += float(log_p.sum())
            eps_sum += float(epsilon_log_likelihood(log_p, epsilon, vocab).sum())
    seconds = time.perf_counter() - start
    if tokens == 0:
        raise RuntimeError(f"no tokens to score in {cfg.dataset.gen_subset}")
    loss_base2 = -log_sum / tokens / math.log(2)
    if record_path is not None:
        from experiments.core.per_example import save_token_log_probs

        save_token_log_probs(record_path, torch.cat(per_token).numpy(), epsilon, vocab)
    report(
        "score_lm",
        {
            "tokens": tokens,
            "zero_prob_tokens": zeros,
            "loss_base2": loss_base2 if math.isfinite(loss_base2) else None,
            "eps_loss_base2": -eps_sum / tokens / math.log(2),
            "epsilon": epsilon,
            "vocab": vocab,
            "seconds": seconds,
        },
    )


# --- dry run ----------------------------------------------------------------------------------------


def dry_run(argv: list[str]) -> None:
    """In the child: fairseq's own task / model / criterion / Trainer, two ``train_step``s."""
    import torch
    from fairseq import options, tasks
    from fairseq.data import Dictionary
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.tasks.language_modeling import LanguageModelingTask
    from fairseq.trainer import Trainer

    extra = json.loads(os.environ.get("MULTIMAX_DRY_RUN", "{}"))
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, input_args=argv)
    cfg = convert_namespace_to_omegaconf(args)
    cuda = torch.cuda.is_available() and not cfg.common.cpu
    max_tokens = int(cfg.dataset.max_tokens)
    update_freq = int(cfg.optimization.update_freq[0])
    micro_tokens = max_tokens
    if not cuda and extra.get("cpu_max_tokens"):
        micro_tokens = min(max_tokens, extra["cpu_max_tokens"])
    vocab = extra.get("vocab")
    torch.manual_seed(0)

    def dictionary(size: int) -> Dictionary:
        d = Dictionary()
        for i in range(size - len(d)):
            d.add_symbol(f"tok{i}")
        return d

    task_cls = tasks.TASK_REGISTRY[cfg.task._name]
    # fairseq's task or the plugin's subclass of it (multimax_language_modeling)
    is_lm = issubclass(task_cls, LanguageModelingTask)
    if vocab:
        if is_lm:
            d = dictionary(int(vocab["size"]))
            task = task_cls(cfg.task, d, d)
        else:
            task = task_cls(cfg.task, dictionary(int(vocab["src"])), dictionary(int(vocab["tgt"])))
        _report_text(
            "[dry run] data missing: random tokens of the real shapes, published vocabularies"
        )
    else:
        task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    trainer = Trainer(cfg, task, model, criterion)

    def random_sample() -> dict:
        pad, n_vocab = task.target_dictionary.pad(), len(task.target_dictionary)
        if is_lm:
            seq = int(cfg.task.tokens_per_sample)
            bsz = max(1, micro_tokens // seq)
            tokens = torch.randint(4, n_vocab, (bsz, seq))
            net_input = {"src_tokens": tokens, "src_lengths": torch.full((bsz,), seq)}
            target = torch.roll(tokens, -1, dims=1)
        else:
            seq = int(extra.get("mt_sentence_tokens", 32))
            bsz = max(1, micro_tokens // seq)
            src = torch.randint(4, len(task.source_dictionary), (bsz, seq))
            target = torch.randint(4, n_vocab, (bsz, seq))
            target[:, -1] = task.target_dictionary.eos()
            prev = torch.cat([target[:, -1:], target[:, :-1]], dim=1)
            net_input = {
                "src_tokens": src,
                "src_lengths": torch.full((bsz,), seq),
                "prev_output_tokens": prev,
            }
        del pad
        return {
            "id": torch.arange(bsz),
            "nsentences": bsz,
            "ntokens": int(target.numel()),
            "net_input": net_input,
            "target": target,
        }

    if vocab:
        batches = [random_sample() for _ in range(2)]
    else:
        task.load_dataset(cfg.dataset.train_subset, epoch=1)
        itr = trainer.get_train_iterator(epoch=1, load_dataset=False).next_epoch_itr(shuffle=True)
        batches = [next(itr) for _ in range(2)]
        if micro_tokens < max_tokens:  # CPU: a slice of the real batch, extrapolated below
            batches = [random_sample() for _ in range(2)]
    times = []
    for sample in batches:
        t0 = time.perf_counter()
        trainer.train_step([sample])
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_tokens = max_tokens * update_freq
    # per optimiser step = update_freq micro-batches of max_tokens each
    scale = update_freq * max_tokens / max(1, int(batches[-1]["ntokens"]))
    if micro_tokens < max_tokens or vocab:
        scale = update_freq * max_tokens / micro_tokens
    step_seconds = times[-1] * scale
    params = sum(p.numel() for p in model.parameters())
    device = torch.device("cuda") if cuda else torch.device("cpu")
    world = int(extra.get("world_size", 1))
    with contextlib.redirect_stdout(io.StringIO()):
        report_text = dry_run_report(
            task=f"{extra.get('task_name', cfg.task._name)} ({cfg.model._name})",
            parameters=params,
            items_per_step=step_tokens * world,
            item_name="tokens",
            step_seconds=step_seconds,
            total_steps=int(extra.get("total_steps") or cfg.optimization.max_update or 0),
            device=device,
            world_size=world,
        )
    _report_text(report_text)
    from multimax.integrations.fairseq_plugin.attention import sigma_placement

    for line in sigma_placement(model):  # where σ acts (--attn-normalizer-scope ...)
        _report_text(f"  {line}")
    _report_text(
        f"  measured:          {times[-1]:.3f} s for one micro-batch of "
        f"{int(batches[-1]['ntokens']):,} tokens (x{scale:.1f} = one update of "
        f"{step_tokens:,} tokens per device); parameters finite after the steps: "
        f"{all(bool(p.detach().isfinite().all()) for p in model.parameters())}"
    )


# --- entry point ------------------------------------------------------------------------------------


# --- check_args: fairseq's own parsers on a run's command lines, before the run starts -----------


class _ParseError(Exception):
    """argparse's error, raised instead of printing the usage and exiting."""


def _raise_parse_error(_parser, message: str) -> None:
    raise _ParseError(message)


def check_args(argv: list[str]) -> None:
    """Parse ``[[program, args], ...]`` (JSON; program ``fairseq-train``, ``fairseq-eval-lm``,
    ``fairseq-generate`` or ``fairseq-validate``) exactly as those programs do (user dir,
    architecture, task, criterion, optimizer and scheduler options included); report
    ``[[program, argparse's error or None], ...]``."""
    import argparse

    lines = json.loads(argv[0])
    argparse.ArgumentParser.error = _raise_parse_error  # type: ignore[method-assign]
    from fairseq import options

    parsers = {
        "fairseq-train": options.get_training_parser,
        "fairseq-eval-lm": options.get_eval_lm_parser,
        "fairseq-generate": options.get_generation_parser,
        "fairseq-interactive": options.get_interactive_generation_parser,
        "fairseq-validate": options.get_validation_parser,
    }
    found = []
    for program, args in lines:
        try:
            options.parse_args_and_arch(parsers[program](), args)
            found.append([program, None])
        except _ParseError as err:
            found.append([program, str(err)])
    report("check_args", found)


def main(argv: list[str]) -> None:
    stage, args = argv[0], argv[1:]
    if stage not in STAGES:
        raise SystemExit(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    die_with_parent()
    from multimax.integrations.fairseq_checkpoints import allow_fairseq_checkpoints

    allow_fairseq_checkpoints()
    if stage == "dry_run":
        dry_run(args)
        return
    if stage == "score_lm":
        score_lm(args)
        return
    if stage == "check_args":
        check_args(args)
        return
    import importlib

    cli = importlib.import_module(f"fairseq_cli.{stage}")
    sys.argv = [f"fairseq-{stage}", *args]
    try:
        if stage == "train":
            train_until_stop_signal(args)
        else:
            cli.cli_main()
    except BaseException as err:
        if stage == "train" and _is_non_finite(err):
            done = _updates_done()
            report(
                "non_finite",
                {"updates_done": done, "error": str(err).strip().splitlines()[-1][:300]},
            )
            sys.exit(STOP_EXIT_CODE)
        raise


if __name__ == "__main__":
    main(sys.argv[1:])
