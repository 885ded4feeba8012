"""`Conversation`: turns appended to one cache are the whole transcript, token for token and
logit for logit; answers stay in the cache at their positions; stops and failures leave it whole."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from hae_cli.cache.modality import Modality
from hae_cli.conversation import Conversation
from hae_cli.errors import InputError
from hae_cli.model.interface import PromptTokens, UserTurn
from hae_cli.model.phi3v.prompt import chat_text, encode_prompt_text
from hae_process import REPO

IMAGES = [REPO / "sample_images" / f"easyvqa_test_{n:04d}.png" for n in (63, 198, 394)]


def one_forward(demo, conversation: Conversation) -> torch.Tensor:
    """Logits at every row of one forward over the conversation's transcript, no cache."""
    ids = torch.tensor(conversation.fed_ids)
    rows = PromptTokens(ids, torch.zeros(len(ids), dtype=torch.int8), torch.zeros(len(ids), dtype=torch.int16), [])
    with torch.inference_mode():
        embeds = demo.network.embed(rows, [None] * conversation.num_images, conversation.image_features)
        return demo.network.forward_embeds(embeds, torch.arange(len(ids)), None, logits_rows=len(ids)).logits[0].float()


def test_full_cache_turns_equal_one_forward_over_the_transcript(demo):
    conversation = Conversation(demo, IMAGES[:2], policy="full", max_new_tokens=4)
    conversation.ask("what shape is in image 1?")
    conversation.ask("what color is the shape in image 2?")
    conversation.add_images(IMAGES[2:])
    conversation.ask("what shape is in image 3?")
    logits = one_forward(demo, conversation)
    for turn in conversation.turns:
        row = turn.start_position + turn.fed_tokens - 1  # the row the answer's first token is drawn from
        torch.testing.assert_close(turn.first_logits, logits[row], atol=2e-5, rtol=1e-5)
        # and the answer the cache produced is the one greedy decoding over the transcript gives
        answer_rows = range(row, row + len(turn.result.token_ids))
        assert [int(logits[r].argmax()) for r in answer_rows] == turn.result.token_ids


def test_the_fed_ids_are_the_chat_templates_whole_transcript(demo):
    conversation = Conversation(demo, IMAGES[:2], policy="hae", max_new_tokens=4)
    questions = ["what shape is in image 1?", "is there a circle in image 2?", "which image shows a brown shape?"]
    messages = []
    for question in questions:
        turn = conversation.ask(question)
        content = demo.render(UserTurn(question, 2, labelled=True)) if not messages else question
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": turn.result.text}]
    whole = encode_prompt_text(demo.tokenizer, chat_text(demo.tokenizer, messages), conversation._images)
    # the template closes the last answer with "<|end|>\n", which is fed with the next question
    assert conversation.fed_ids == whole.input_ids.tolist()[:-2]


def test_the_cache_after_turn_two_holds_turn_ones_answer_at_its_positions(demo):
    conversation = Conversation(demo, IMAGES[:2], policy="full", max_new_tokens=4)
    first = conversation.ask("what shape is in image 1?")
    second = conversation.ask("what color is the shape in image 2?")
    answer_start = first.start_position + first.fed_tokens
    answer_positions = list(range(answer_start, answer_start + len(first.result.token_ids)))
    assert answer_positions, "the demo model answers"
    assert second.start_position == answer_positions[-1] + 1
    for layer in conversation.cache.layers:
        positions = layer.token_index[0].tolist()
        assert positions == list(range(len(conversation.fed_ids)))
        modality = layer.modality[0]
        assert all(int(modality[p]) == Modality.GENERATED for p in answer_positions)
        fed = range(second.start_position, second.start_position + second.fed_tokens)
        assert all(int(modality[p]) == Modality.TEXT for p in fed)


def test_an_evicting_cache_holds_its_budget_through_every_turn(demo):
    conversation = Conversation(demo, IMAGES[:2], policy="hae", policy_params={"budget": 120, "buffer": 8},
                                max_new_tokens=6)
    for question in ["what shape is in image 1?", "what color is the shape in image 2?", "is there a circle in image 1?"]:
        turn = conversation.ask(question)
        for step in turn.result.steps:
            for layer in step.layers:
                assert layer.tokens_held <= layer.budget + 8
    assert conversation.cache.tokens_fed == len(conversation.fed_ids)
    for layer in conversation.cache.layers:
        held = layer.token_index[0]
        assert bool((held[1:] > held[:-1]).all()), "rows stay in position order"
    assert sum(turn.actions["binned"] for turn in conversation.turns) > 0


def test_a_stop_request_ends_the_answer_and_the_conversation_goes_on_exactly(demo):
    conversation = Conversation(demo, IMAGES[:2], policy="full", max_new_tokens=40)
    turn = conversation.ask("describe each image in order.", should_stop=lambda: True)
    assert turn.result.stopped_by == "interrupt" and len(turn.result.token_ids) == 1
    conversation.ask("what shape is in image 2?")
    logits = one_forward(demo, conversation)
    last = conversation.turns[-1]
    torch.testing.assert_close(last.first_logits, logits[last.start_position + last.fed_tokens - 1], atol=2e-5, rtol=1e-5)


def test_an_interruption_inside_a_step_refuses_to_go_on_until_reset(demo, monkeypatch):
    conversation = Conversation(demo, IMAGES[:2], policy="hae", max_new_tokens=4)
    layers = demo.network.language_model.model.layers
    original = type(layers[1]).forward

    def interrupted(self, *args, **kwargs):
        if self is layers[1]:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(layers[1]), "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        conversation.ask("what shape is in image 1?")
    monkeypatch.undo()
    with pytest.raises(InputError, match="/reset"):
        conversation.ask("what shape is in image 1?")
    conversation.reset()
    assert conversation.ask("what shape is in image 1?").result.text


def test_a_turn_past_the_context_is_refused_and_changes_nothing(demo):
    small = dataclasses.replace(demo.limits, context_tokens=700)
    tight = copy.copy(demo)
    tight.limits = small
    conversation = Conversation(tight, IMAGES[:2], policy="full", max_new_tokens=4)
    conversation.ask("what shape is in image 1?")
    fed = conversation.fed_ids
    conversation.add_images(IMAGES[2:])  # 313 more slots: past 700
    with pytest.raises(InputError, match="700 tokens"):
        conversation.ask("what shape is in image 3?")
    assert conversation.fed_ids == fed and len(conversation.turns) == 1


def test_images_added_before_the_first_question_join_the_prefill(demo):
    conversation = Conversation(demo, IMAGES[:1], policy="hae")
    conversation.add_images(IMAGES[1:3])
    assert conversation.cache.image_sizes == [313, 313, 313]
    assert conversation.prefill_stats.step == 0 and conversation.turns == []
    turn = conversation.ask("what shape is in image 3?")
    assert turn.images_added == []
