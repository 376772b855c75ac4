"""The tool-interleaving loop: one coroutine per trajectory.

Decode until a cell closes -> run it in the trajectory's own session -> append the interpreter's reply as
tokens -> decode again, until EOS or a budget. The trajectory is assembled from token ids as they were
generated or appended (token-in, token-out): nothing is ever re-tokenized or re-rendered through a chat
template, so the training tensors are exactly what the model saw.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from retool.rollout.backend import GenerationRequest
from retool.types import ExecutionResult, FinishReason, Problem, ToolCall, Trace, Trajectory

if TYPE_CHECKING:
    from retool.executor import Executor
    from retool.rollout.backend import RolloutBackend
    from retool.rollout.failures import ExecutorFailures


def prompt_token_ids(backend: RolloutBackend, problem: Problem) -> list[int]:
    """Render the format's messages for ``problem`` through the model's chat template, as token ids."""
    tokenizer = backend.tokenizer
    messages = backend.format.messages(problem)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # a bare tokenizer (tiny test models): plain text with role headers
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return list(tokenizer.encode(text, add_special_tokens=False))


def trace_trajectory(backend: RolloutBackend, trace: Trace, max_length: int | None = None) -> Trajectory:
    """A written-out solution as the :class:`Trajectory` a rollout would have produced, for supervised training.

    The prompt is rendered exactly as :func:`prompt_token_ids` renders it for a rollout (same format, same
    chat template), so SFT and RL see the same tokens. The response is cut by the format into the model's
    pieces and the interpreter's replies; each piece is tokenized on its own, as a rollout appends the
    interpreter's reply as separately tokenized text, and only the model's pieces (and the end-of-turn token
    that closes the response) get ``loss_mask`` 1. ``max_length`` cuts the sequence (``finish_reason`` is
    then ``"length"``).
    """
    tokenizer = backend.tokenizer
    prompt_ids = prompt_token_ids(backend, trace.problem)
    token_ids, loss_mask = list(prompt_ids), [0] * len(prompt_ids)
    model_text: list[str] = []
    for text, by_model in backend.format.split_response(trace.response):
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        token_ids += ids
        loss_mask += [int(by_model)] * len(ids)
        if by_model:
            model_text.append(text)
    if tokenizer.eos_token_id is not None:  # the model must learn to end its turn
        token_ids.append(int(tokenizer.eos_token_id))
        loss_mask.append(1)
    finish: FinishReason = "eos"
    if max_length is not None and len(token_ids) > max_length:
        token_ids, loss_mask, finish = token_ids[:max_length], loss_mask[:max_length], "length"
    return Trajectory(
        problem_id=trace.problem.id,
        group=0,
        token_ids=token_ids,
        loss_mask=loss_mask,
        prompt_len=min(len(prompt_ids), len(token_ids)),
        prompt_text=tokenizer.decode(prompt_ids, skip_special_tokens=False),
        response_text=trace.response,
        model_text="".join(model_text),
        finish_reason=finish,
    )


async def run_trajectory(
    backend: RolloutBackend,
    executor: Executor | None,
    problem: Problem,
    group: int,
    session: str,
) -> Trajectory:
    """Roll out one trajectory for ``problem``; its cells run in ``session``, closed at the end."""
    tokenizer = backend.tokenizer
    fmt = backend.format
    prompt_ids = prompt_token_ids(backend, problem)
    token_ids = list(prompt_ids)
    loss_mask = [0] * len(prompt_ids)
    logprobs = [0.0] * len(prompt_ids)
    spans: list[tuple[int, int]] = []  # model-written [start, end) token spans
    tool_calls: list[ToolCall] = []
    budget = backend.max_new_tokens
    segment = ""  # model text since the last interpreter reply
    finish: FinishReason = "eos"
    try:
        while True:
            # Bind the current segment as a default so the closure never sees a later value.
            def stop(new_text: str, prefix: str = segment) -> bool:
                return fmt.cell_closed(prefix + new_text)

            request = GenerationRequest(
                token_ids=token_ids,
                max_new_tokens=budget,
                stop=stop if executor is not None else None,
                request_id=session,
            )
            generation = await backend.generate(request)
            start = len(token_ids)
            token_ids = token_ids + generation.token_ids
            loss_mask += [1] * len(generation.token_ids)
            logprobs += list(generation.logprobs)
            spans.append((start, len(token_ids)))
            budget -= len(generation.token_ids)
            segment += tokenizer.decode(generation.token_ids, skip_special_tokens=False)
            if generation.finish_reason != "stop":
                finish = generation.finish_reason
                break
            code = fmt.extract_code(segment) if executor is not None else None
            if code is None:  # the backend stopped for a reason the format does not recognize
                finish = "stop"
                break
            if len(tool_calls) >= backend.max_tool_calls:
                finish = "max_tool_calls"
                break
            result = await _execute(executor, code, session, getattr(backend, "executor_failures", None))
            feedback = fmt.feedback(result)
            feedback_ids = list(tokenizer.encode(feedback, add_special_tokens=False))
            tool_start = len(token_ids)
            token_ids = token_ids + feedback_ids
            loss_mask += [0] * len(feedback_ids)
            logprobs += [0.0] * len(feedback_ids)
            tool_calls.append(ToolCall(code, result, feedback, tool_start, len(token_ids)))
            segment = ""
            if budget <= 0:
                finish = "length"
                break
    finally:
        if executor is not None:
            await executor.close_session(session)
    response_ids = token_ids[len(prompt_ids) :]
    model_text = "".join(tokenizer.decode(token_ids[a:b], skip_special_tokens=True) for a, b in spans)
    return Trajectory(
        problem_id=problem.id,
        group=group,
        token_ids=token_ids,
        loss_mask=loss_mask,
        prompt_len=len(prompt_ids),
        prompt_text=tokenizer.decode(prompt_ids, skip_special_tokens=False),
        response_text=tokenizer.decode(response_ids, skip_special_tokens=False),
        model_text=model_text,
        tool_calls=tool_calls,
        finish_reason=finish,
        logprobs=logprobs,
    )


async def _execute(
    executor: Executor | None, code: str, session: str, failures: ExecutorFailures | None
) -> ExecutionResult:
    """Run a cell; an executor that raises (it should not) becomes a recorded error, never a dead rollout.

    Either way a failure of the executor is logged and counted, and enough of them in a row stop the run
    (:class:`~retool.rollout.failures.ExecutorFailing`).
    """
    assert executor is not None
    raised = None
    try:
        result = await executor.execute(code, session)
    except Exception as exc:  # the contract says execute never raises; a buggy plugin must not kill the run
        raised = exc
        result = ExecutionResult(error=f"ExecutorError: {type(exc).__name__}: {exc}", stop_reason="crash")
    if failures is not None:
        failures.record(result, raised)
    return result


async def rollout_groups(
    backend: RolloutBackend,
    problems: Sequence[Problem],
    group_size: int,
    executor: Executor | None,
    session_prefix: str = "",
    first_index: int = 0,
) -> list[Trajectory]:
    """Run ``group_size`` trajectories per problem concurrently; each gets its own executor session."""
    run_id = session_prefix or uuid.uuid4().hex[:8]
    tasks = [
        asyncio.ensure_future(run_trajectory(backend, executor, problem, g, f"{run_id}-{i}-{g}"))
        for i, problem in enumerate(problems, start=first_index)
        for g in range(group_size)
    ]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
