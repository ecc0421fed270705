"""Evaluation: task validation, answer extraction, and scores checked independently."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mergepipe.errors import MergePipeError
from mergepipe.evaluate import TaskItem, evaluate_model, extract_answer, load_task, normalize
from mergepipe.world import resolve_task

sys.path.insert(0, str(Path(__file__).parent))
from world_fixtures import final_number, greedy_reference, built_test_world  # noqa: E402


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("\n\n", "is empty"),
    ('{"prompt": "1+1="}\n', "line 1: missing field 'answer'"),
    ('{"prompt": "a", "answer": "1"}\n{"answer": "2"}\n', "line 2: missing field 'prompt'"),
    ('{}\n', "line 1: missing fields 'prompt', 'answer'"),
    ('{"prompt": "a", "answer": 1}\nnot json at all\n', "line 2: not valid JSON"),
    ('[1, 2]\n', "line 1: expected a JSON object"),
    ('{"prompt": "", "answer": "1"}\n', "'prompt' must be a non-empty string"),
    ('{"prompt": "a", "answer": null}\n', "'answer' must be a non-empty string or number"),
])
def test_bad_task_file_is_a_clear_one_line_error(tmp_path, content, message):
    path = _write(tmp_path / "bad.jsonl", content)
    with pytest.raises(MergePipeError) as err:
        load_task(path)
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text


def test_missing_task_file_and_unknown_name(tmp_path):
    with pytest.raises(MergePipeError, match="does not exist"):
        load_task(tmp_path / "nope.jsonl")
    with pytest.raises(MergePipeError, match="unknown task 'gsm9k'"):
        resolve_task("gsm9k")


def test_task_rows_keep_numbers_and_extra_fields(tmp_path):
    path = _write(tmp_path / "t.jsonl", '{"prompt": "p", "answer": 42, "steps": 3}\n')
    task = load_task(path)
    assert task.items == (TaskItem("p", "42", {"steps": 3}),)
    with pytest.raises(MergePipeError, match="--limit"):
        task.head(0)


@pytest.mark.parametrize("text, expected", [
    (" 8-6+4=2+4=6 #### 6", "6"),
    ("so the total is #### 1,234.", "1234"),
    ("#### $18", "18"),
    ("#### -3", "-3"),
    ("first 3 then 7 and finally 12", "12"),
    ("answer: 2.50", "2.5"),
    ("no digits here", None),
    ("#### 7 #### 9", "9"),
    ("4.0", "4"),
])
def test_answer_extraction_rule(text, expected):
    assert extract_answer(text) == expected


def test_normalize_makes_equal_numbers_equal():
    assert normalize("1,000") == normalize("1000") == normalize("1000.0")
    assert normalize(" Paris ") == "paris"


def test_transformers_backend_matches_hand_written_greedy_decoding(tmp_path):
    """Accuracy and token counts equal an independent one-prompt-at-a-time greedy loop."""
    world = built_test_world()
    model = world / "reasoning"
    rows = [json.loads(line) for line in (world / "test.jsonl").read_text().splitlines()][:24]
    prompts = [r["prompt"] for r in rows]
    max_new = 40
    reference = greedy_reference(model, prompts, max_new)
    # Answers are chosen so the expected accuracy is known: every third item gets
    # the model's own final answer, the rest an answer it cannot produce.
    answers, expected_correct = [], 0
    for i, (text, _) in enumerate(reference):
        own = final_number(text)
        if i % 3 == 0 and own is not None:
            answers.append(own)
            expected_correct += 1
        else:
            answers.append("-777")
    task = _write(tmp_path / "known.jsonl", "".join(
        json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(prompts, answers)))
    expected_tokens = sum(n for _, n in reference) / len(reference)
    for batch_size in (1, 5, 64):  # padding across different prompt lengths must not matter
        res = evaluate_model(model, task, device="cpu", max_new_tokens=max_new,
                             batch_size=batch_size)
        assert res.n == len(rows)
        assert [o["completion"] for o in res.outputs] == [t for t, _ in reference]
        assert [o["tokens"] for o in res.outputs] == [n for _, n in reference]
        assert res.accuracy == pytest.approx(expected_correct / len(rows))
        assert res.mean_tokens == pytest.approx(expected_tokens)
    assert expected_correct >= 2
    assert len({n for _, n in reference}) > 1  # lengths differ, so counting is exercised
    short = evaluate_model(model, task, device="cpu", max_new_tokens=3, limit=4)
    assert short.n == 4 and short.mean_tokens <= 3


def test_eval_command_prints_json_and_records_in_catalog(cli):
    world = built_test_world()
    res = cli("eval", str(world / "base"), "--task", str(world / "test.jsonl"),
              "--limit", "10", "--json", "--device", "cpu")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["n"] == 10 and 0.0 <= out["accuracy"] <= 1.0 and out["mean_tokens"] > 0
    rows = json.loads("[" + ",".join(cli(
        "sql", "SELECT model, metric, value, n, split FROM evaluations_view ORDER BY metric",
        "--format", "json").stdout.strip().splitlines()) + "]")
    assert [(r["metric"], r["n"], r["split"]) for r in rows] == \
        [("accuracy", 10, "test"), ("mean_tokens", 10, "test")]
    assert rows[0]["value"] == pytest.approx(out["accuracy"])
    assert rows[1]["value"] == pytest.approx(out["mean_tokens"])
    # by catalog name the second time; the table format names the model
    text = cli("eval", rows[0]["model"], "--task", str(world / "test.jsonl"), "--limit", "3",
               "--device", "cpu").stdout
    assert rows[0]["model"] in text and "accuracy" in text


def test_eval_command_rejects_a_bad_task_before_loading_anything(cli, tmp_path):
    bad = _write(tmp_path / "bad.jsonl", '{"prompt": "x"}\n')
    res = cli("eval", str(tmp_path / "no-model"), "--task", str(bad), ok=False)
    assert res.exit_code != 0
    assert res.stderr == f"error: task file {bad} line 1: missing field 'answer'\n"


def test_vllm_backend_says_how_to_install_when_missing(tmp_path, monkeypatch):
    # as if vLLM were not installed (CI installs it, and this must run there too)
    monkeypatch.setattr("mergepipe.evaluate.vllm.vllm_available", lambda: False)
    with pytest.raises(MergePipeError, match="optional `vllm` package"):
        evaluate_model(built_test_world() / "base", _write(
            tmp_path / "t.jsonl", '{"prompt": "p", "answer": "1"}\n'), backend="vllm")


def test_a_process_with_numba_loaded_survives_vllms_module_scan():
    """vLLM's engine start reads ``vars(v)`` of every module global ``v`` that has a
    ``__dict__``; llvmlite's library handle (loaded with numba, which the merge loops
    use) claimed one and broke every engine start after a merge in the same process."""
    import sys

    from mergepipe.evaluate.vllm import _hide_llvmlite_dunders
    from mergepipe.methods.kernels import warm

    warm()
    _hide_llvmlite_dunders()
    for module in list(sys.modules.values()):   # the scan, as vLLM 0.32 does it
        for value in list((getattr(module, "__dict__", None) or {}).values()):
            if hasattr(value, "__dict__"):
                vars(value).get("kernel")
    import llvmlite.binding.ffi as ffi
    assert ffi.lib.LLVMPY_GetVersionInfo is not None   # its functions still resolve
