"""The synchronous engine: requests in, one step at a time, delta outputs out (nano-vllm's LLMEngine shape).

step() = schedule -> run the model -> postprocess (append tokens, detokenize, check stops, fork n>1 choices,
free finished sequences) -> one RequestOutput per request that has news. It is not thread-safe: the async
engine calls every method from its one loop thread.
"""

from __future__ import annotations

import concurrent.futures
import logging
import operator
import time
from collections.abc import Callable

import torch

from model.config import ModelConfig
from model.loader import load_model
from model.network import GlmMoeDsaForCausalLM
from model.tokenizer import Tokenizer

from .block_manager import BlockManager
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .model_runner import ModelRunner, StepResult, graph_mode, num_cache_blocks, resolve_device_dtype
from .output_processor import eos_token_ids
from .outputs import CompletionOutput, EngineStats, RequestOutput
from .sampling_params import SamplingParams, validate_request
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Sequence, SequenceGroup, SequenceStatus
from .spec_decode import SpecDecode
from .spec_policy import make_policy
from .speculative import MTPProposer

log = logging.getLogger("glm_serve.engine")


class LLMEngine:
    def __init__(self, model: GlmMoeDsaForCausalLM, config: EngineConfig, tokenizer: Tokenizer | None = None) -> None:
        self.config = config
        self.model = model
        self.model_config: ModelConfig = model.config
        self.tokenizer = tokenizer
        device, dtype = resolve_device_dtype(config)
        if device.type == "cpu" and config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        cfg = self.model_config
        if config.max_num_seqs < 1 or config.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        max_len = config.max_model_len or cfg.max_position_embeddings
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len {max_len} exceeds the model's max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        num_blocks = num_cache_blocks(config, model, max_len, dtype, device)
        capacity = num_blocks * config.block_size
        if capacity < max_len:  # one sequence must always fit, or preemption could never make room for it
            log.warning("kv cache holds %d tokens: max_model_len lowered from %d", capacity, max_len)
            max_len = capacity
        self.max_model_len = max_len
        generator = torch.Generator(device).manual_seed(config.seed)
        k = config.num_speculative_tokens
        if k < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0, got {k}")
        make_policy(config.speculative_policy, 1)  # a bad policy name fails even where nothing drafts
        if k and not model.has_mtp:
            log.info("the checkpoint has no MTP layer: speculative decoding is off")
            k = 0
        self.num_speculative_tokens = k
        self.runner = ModelRunner(model, num_blocks, config.block_size, device, dtype, generator, k,
                                  graph_mode(config, device), config.max_num_seqs, max_len)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                          config.prefix_caching_hash_algo)
        runner = self.runner
        self.proposer = MTPProposer(runner.model, runner.cache, runner.sampler, self.block_manager, device, k,
                                    runner.draft_graphs) if k else None
        self.spec = None
        if self.proposer is not None:
            self.spec = SpecDecode(self.proposer, make_policy(config.speculative_policy, k), self.block_manager)
            log.info("MTP speculative decoding on: up to %d drafts a step, %s (--num-speculative-tokens 0: off)",
                     k, config.speculative_policy)
            # A drafting sequence reuses cached blocks only with their MTP entries.
            self.block_manager.needs_mtp = self.spec.eligible
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.requests: dict[str, SequenceGroup] = {}
        self.eos_token_ids = eos_token_ids(cfg, tokenizer)
        self.fault_injector: Callable[[SchedulerOutput], None] | None = None  # tests: raise inside a step
        self.executor = None  # tensor parallelism: relays model calls to the other ranks (from_config sets it)
        self.dsa_tokens_read = 0
        self.dsa_tokens_cached = 0
        self.grammars = None  # compiles structured-output grammars off the step loop (first use loads xgrammar)
        if tokenizer is not None:
            from .structured import GrammarCompilerPool

            self.grammars = GrammarCompilerPool(tokenizer, cfg.vocab_size, self.eos_token_ids)
        # Requests whose grammar is still compiling: not yet given to the scheduler.
        self.pending_grammar: dict[SequenceGroup, concurrent.futures.Future] = {}
        # Set when a request finishes outside a step (abort, failed grammar): only then does a step scan every
        # request for finished ones, so a step's bookkeeping grows with its batch, not with all requests.
        self._finished_elsewhere = False
        log.info("engine: %s %s, %d cache blocks x %d tokens, max_model_len %d", device, dtype, num_blocks,
                 config.block_size, max_len)

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        """Load the checkpoint (and its tokenizer, when it has a tokenizer.json) named by `config.model`."""
        device, dtype = resolve_device_dtype(config)
        executor = None
        if config.tensor_parallel_size > 1:  # join the other ranks first: the model is built sharded
            from .parallel_executor import ParallelExecutor

            executor = ParallelExecutor.start(config)
        try:
            model = load_model(config.model, dtype, device, quantization=config.quantization)
            engine = cls(model, config, Tokenizer.from_checkpoint(config.model))
            if executor is not None:
                executor.attach(engine)
                engine.executor = executor
        except BaseException:
            if executor is not None:
                executor.shutdown()
            raise
        return engine

    @property
    def idle_interval(self) -> float | None:
        """How long an idle loop may wait before calling `heartbeat` (None: forever)."""
        if self.executor is None:
            return None
        from .parallel_executor import HEARTBEAT_S

        return HEARTBEAT_S / 2

    def heartbeat(self) -> None:
        """Called by the loop while idle (no-op without tensor parallelism: see parallel_executor)."""
        if self.executor is not None:
            self.executor.heartbeat()

    def close(self) -> None:
        """Stop the other tensor-parallel ranks, if any."""
        if self.executor is not None:
            self.executor.shutdown()
            self.executor = None

    # -- requests ------------------------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError for a request the engine cannot serve. Reads only fixed settings: any thread may call it."""
        validate_request(prompt_token_ids, params, self.model_config.vocab_size, self.max_model_len,
                         self.config.max_num_seqs, self.tokenizer is not None)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate(prompt_token_ids, params)
        group = SequenceGroup(request_id, list(prompt_token_ids), params, arrival_time or time.monotonic())
        for i in range(params.n):
            generator = None
            if params.seed is not None:  # choice i of a seeded request draws from seed + i, whatever the batch
                generator = torch.Generator(self.runner.device).manual_seed(params.seed + i)
            detok = None
            if self.tokenizer is not None and self.config.detokenize:
                detok = IncrementalDetokenizer(self.tokenizer, group.prompt_token_ids, params)
            seq = Sequence(group, i, generator, detok)
            if i > 0:
                seq.status = SequenceStatus.FORKING
            group.seqs.append(seq)
        self.requests[request_id] = group
        if params.structured is not None and self.grammars is not None:
            self.pending_grammar[group] = self.grammars.submit(params.structured)
            return
        self.scheduler.add(group.seqs[0])

    def _admit_compiled(self) -> None:
        """Hand requests whose grammar has compiled to the scheduler, each choice with its own matcher. When
        nothing else can run, wait a moment for a compile instead of spinning the loop."""
        if not self.pending_grammar:
            return
        if not self.scheduler.running and not self.scheduler.waiting:
            concurrent.futures.wait(list(self.pending_grammar.values()), timeout=0.01,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        from .structured import SequenceGrammar

        for group, future in list(self.pending_grammar.items()):
            if not future.done():
                continue
            del self.pending_grammar[group]
            try:
                compiled = future.result()
            except Exception as e:  # the API checks specs first; a compile failure here is the engine's fault
                log.error("grammar compile failed for %s: %s", group.request_id, e)
                for seq in group.seqs:
                    seq.finish("error")
                self._finished_elsewhere = True
                continue
            for seq in group.seqs:
                seq.grammar = SequenceGrammar(compiled)
            self.scheduler.add(group.seqs[0])

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; its final output (finish_reason "abort") comes with the next
        step. Returns False for an unknown or finished request."""
        group = self.requests.get(request_id)
        if group is None:
            return False
        self.pending_grammar.pop(group, None)
        for seq in group.seqs:
            if not seq.is_finished:
                self.scheduler.remove(seq)
                seq.finish("abort")
        self._finished_elsewhere = True
        return True

    def finish_choice(self, request_id: str, index: int) -> bool:
        """Stop choice `index` now and free its blocks: a stop string the API process found ended it there
        (output_processor.py), which has already reported it, so no output of it follows. Returns False when
        there is nothing to stop (an unknown request or choice, or one already finished)."""
        group = self.requests.get(request_id)
        if group is None or not 0 <= index < len(group.seqs) or group.seqs[index].is_finished:
            return False
        seq = group.seqs[index]
        self.scheduler.remove(seq)
        seq.finish("stop")
        seq.finish_reported = True
        seq.new_token_ids, seq.new_text, seq.new_logprobs = [], "", []
        if group.is_finished:  # its last choice: the API process has ended the request
            self.requests.pop(request_id, None)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- the step ------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        # Requests with news this step, in order (a dict as an ordered set); first those aborted since the last.
        touched = self._take_finished_elsewhere()
        sched = SchedulerOutput()
        t0 = time.perf_counter()
        try:
            self._admit_compiled()
            touched.update(self._take_finished_elsewhere())
            sched = self.scheduler.schedule()
            now = time.monotonic()
            for seq, _ in sched.scheduled:
                group = seq.group
                touched[group] = None
                if group.first_scheduled_time is None:
                    group.first_scheduled_time = now
            if self.fault_injector is not None:
                self.fault_injector(sched)
            if not sched.is_empty:
                if self.spec is not None:
                    self.spec.begin_step(sched, t0)
                self.runner.copy_blocks(sched.copies)  # partly reused cached blocks, before anything writes
                self._postprocess(sched, self.runner.execute(sched.scheduled))
        except Exception as e:  # fail this step's requests, keep serving the rest
            if self.executor is not None:
                raise  # tensor parallel: the ranks may be out of step now; the loop dies and says so
            log.exception("engine step failed")
            # The step's requests; all of them when scheduling itself broke (its state is then unknown).
            failed = {s.group: None for s, _ in sched.scheduled} or dict.fromkeys(self.requests.values())
            for group in failed:
                for seq in group.seqs:
                    self.scheduler.remove(seq)
                    if not seq.finish_reported:
                        seq.finish("error")
            error = f"{type(e).__name__}: {e}"
            outs = [self._output(g, error=error if g in failed else None) for g in {**touched, **failed}]
            return [out for out in outs if out is not None]
        return [out for g in touched if (out := self._output(g)) is not None]

    def _take_finished_elsewhere(self) -> dict[SequenceGroup, None]:
        """Requests finished since the last look outside a step (their final output is still due), in order."""
        if not self._finished_elsewhere:
            return {}
        self._finished_elsewhere = False
        return {g: None for g in self.requests.values() if g.is_finished}

    def _postprocess(self, sched: SchedulerOutput, result: StepResult) -> None:
        """Apply a step's results: positions computed, prompt logprobs, forks, speculation counts, new tokens
        (with stop checks), then the next drafts."""
        starts = self._advance(sched)
        self._store_prompt_logprobs(result)
        self._fork(result)
        if self.spec is not None:
            self.spec.count_verified(result)
        self._append_samples(result)
        if self.spec is not None:
            self.spec.after_step(starts, result, len(self.scheduler.running), self.max_model_len)

    def _advance(self, sched: SchedulerOutput) -> list[tuple[Sequence, int, int]]:
        """Count the step's positions as computed (and the sparse attention's reads); returns, per sequence, its
        computed positions before the step and its first hidden row."""
        topk = self.model_config.index_topk if self.model_config.use_indexer else None
        starts = []
        row = 0
        for seq, n in sched.scheduled:
            starts.append((seq, seq.num_computed_tokens, row))
            row += n
            if topk is not None and seq.num_computed_tokens + 1 == seq.num_tokens:  # decode / verify queries
                for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                    self.dsa_tokens_read += min(topk, p + 1)
                    self.dsa_tokens_cached += p + 1
            # Verified positions count once their drafts are accepted (_count_verified); rejected ones roll back.
            seq.num_computed_tokens += n - len(seq.draft_token_ids)
        return starts

    @staticmethod
    def _store_prompt_logprobs(result: StepResult) -> None:
        for group, first, lps in result.prompt_logprobs:
            if group.prompt_logprobs is None:
                group.prompt_logprobs = [None]
            assert len(group.prompt_logprobs) == first, "prompt logprobs out of order"
            group.prompt_logprobs.extend(lps)

    def _fork(self, result: StepResult) -> None:
        """An n>1 request's other choices start once choice 0's prefill is done, sharing its prompt blocks."""
        children: dict[SequenceGroup, list[Sequence]] = {}
        for seq, _, _ in result.samples:
            if seq.status is SequenceStatus.FORKING:
                children.setdefault(seq.group, []).append(seq)
        for group, kids in children.items():
            self.runner.copy_blocks(self.scheduler.fork(group.seqs[0], kids))

    def _append_samples(self, result: StepResult) -> None:
        check_stop, remove, finished = self._check_stop, self.scheduler.remove, SequenceStatus.FINISHED
        for seq, tokens, logprobs in result.samples:
            output_ids, new_ids = seq.output_token_ids, seq.new_token_ids
            for token, logprob in zip(tokens, logprobs, strict=True):
                output_ids.append(token)
                new_ids.append(token)
                if logprob is not None:
                    seq.new_logprobs.append(logprob)
                check_stop(seq, token)
                if seq.status is finished:  # a stop among accepted drafts drops the rest
                    remove(seq)
                    break

    def _check_stop(self, seq: Sequence, token: int) -> None:
        params = seq.params
        if seq.grammar is not None and not seq.grammar.accept(token):
            # The mask allowed only tokens the grammar accepts, so this is a bug, not the model's doing.
            log.error("grammar refused sampled token %d of %s", token, seq.request_id)
            seq.finish("error")
            return
        stop_token = (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids
        if seq.detokenizer is not None and (not stop_token or params.include_stop_str_in_output):
            out = seq.detokenizer.push([token])
            seq.new_text += out.text_delta
            if out.stop_string is not None:
                seq.finish("stop", out.stop_string)
                return
        if stop_token:
            seq.finish("stop", token if token in params.stop_token_ids else None)
        elif seq.grammar is not None and seq.grammar.terminated:
            seq.finish("stop")  # the grammar is complete (only reachable past a stop token under ignore_eos)
        elif len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish("length")
        if seq.is_finished and seq.detokenizer is not None:
            seq.new_text += seq.detokenizer.flush()

    def _output(self, group: SequenceGroup, error: str | None = None) -> RequestOutput | None:
        """The delta since the last output of `group`, or None when nothing changed."""
        outputs = []
        want_lp = group.params.logprobs is not None
        for seq in group.seqs:
            ended = seq.status is SequenceStatus.FINISHED and not seq.finish_reported
            if not (seq.new_token_ids or seq.new_text or ended):
                continue
            outputs.append(CompletionOutput(
                index=seq.index, text=seq.new_text, token_ids=seq.new_token_ids,
                logprobs=seq.new_logprobs if want_lp else None,
                finish_reason=seq.finish_reason if ended else None, stop_reason=seq.stop_reason if ended else None))
            seq.new_token_ids, seq.new_text, seq.new_logprobs = [], "", []
            seq.finish_reported |= ended
        if not outputs:
            return None
        out = RequestOutput(group.request_id, outputs, finished=group.is_finished,
                            num_generated_tokens=group.num_generated_tokens, error=error,
                            num_cached_tokens=group.num_cached_tokens or 0)
        if not group.queue_time_reported:
            group.queue_time_reported = True
            start = group.first_scheduled_time or time.monotonic()
            out.queue_time_s = max(0.0, start - group.arrival_time)
        if group.prompt_logprobs is not None and not group.prompt_logprobs_reported:
            group.prompt_logprobs_reported = True
            out.prompt_logprobs = group.prompt_logprobs
        if out.finished:
            self.requests.pop(group.request_id, None)
        return out

    # -- metrics -------------------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        # A request runs when one of its choices holds blocks, i.e. is in the scheduler's running list.
        running = len(set(map(_group_of, self.scheduler.running)))
        return EngineStats(
            num_running=running, num_waiting=len(self.requests) - running,
            kv_cache_usage=self.block_manager.usage, num_preemptions=self.scheduler.num_preemptions,
            dsa_tokens_read=self.dsa_tokens_read, dsa_tokens_cached=self.dsa_tokens_cached,
            prefix_cache_queries=self.block_manager.num_queried_tokens,
            prefix_cache_hits=self.block_manager.num_hit_tokens,
            **(self.spec.stats() if self.spec is not None else {}))


_group_of = operator.attrgetter("group")
