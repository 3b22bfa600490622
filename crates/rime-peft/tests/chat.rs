//! Chat SFT data for causal-LM LoRA: the assistant-token mask against hand-computed expectations (a toy
//! template and tokenizer, then SmolLM2's own), every bad-input error with its file and line, conversations
//! longer than max_length (refused, or cut when allowed), and a short run on data/rime_chat whose loss falls.
//! Tests on SmolLM2 say SKIPPED when scripts/fetch-models.sh has not run.

mod common;

use std::path::{Path, PathBuf};

use rime_io::dataset::Columns;
use rime_peft::causal::{chat_tokens, ChatTemplate, ChatTokens};
use rime_peft::data::ChatMessage;
use rime_peft::lora::LoraConfig;
use rime_peft::{CausalData, CausalTask, Event, TrainConfig};

fn smollm2() -> Option<PathBuf> {
    let p = rime_io::models_dir().join("smollm2-135m-instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        eprintln!("SKIPPED: SmolLM2 GGUF not found, run scripts/fetch-models.sh");
        None
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rime_chat_{name}_{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage::new(role, content)
}

const IM_START: u32 = 1000;
const IM_END: u32 = 1001;

/// A toy tokenizer: the two special tokens as 1000 and 1001, every other character as its code point.
fn toy_encode(text: &str) -> rime_peft::Result<Vec<u32>> {
    let mut ids = vec![];
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("<|im_start|>") {
            ids.push(IM_START);
            rest = r;
        } else if let Some(r) = rest.strip_prefix("<|im_end|>") {
            ids.push(IM_END);
            rest = r;
        } else {
            let c = rest.chars().next().unwrap();
            ids.push(c as u32);
            rest = &rest[c.len_utf8()..];
        }
    }
    Ok(ids)
}

/// ChatML without a default system prompt (lines as a multi-line template writes them: trim_blocks drops the
/// newline after each block tag, as transformers does).
const CHATML: &str = "{% for m in messages %}\n<|im_start|>{{ m.role }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}\n\
                      {% if add_generation_prompt %}\n<|im_start|>assistant\n{% endif %}\n";

fn toy_template(template: &str) -> ChatTemplate {
    ChatTemplate {
        template: template.into(),
        bos_token: String::new(),
        eos_token: String::new(),
        end_of_turn: vec![IM_END],
    }
}

fn toy_tokens(template: &str, conv: &[ChatMessage]) -> rime_peft::Result<ChatTokens> {
    let t = toy_template(template);
    chat_tokens(conv, &|m: &[ChatMessage], g: bool| t.render(m, g), &toy_encode, &t.end_of_turn)
}

#[test]
fn assistant_mask_of_a_known_conversation_is_the_assistant_contents_and_their_im_end() {
    let conv =
        [msg("system", "S"), msg("user", "hi"), msg("assistant", "yo"), msg("user", "ok?"), msg("assistant", "ok")];
    let t = toy_template(CHATML);
    assert_eq!(
        t.render(&conv[..2], true).unwrap(),
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ct = toy_tokens(CHATML, &conv).unwrap();
    // Hand-computed: the rendered text token by token, and which tokens are scored.
    let mut want: Vec<(u32, bool)> = vec![];
    let mut add = |s: &str, scored: bool| {
        for id in toy_encode(s).unwrap() {
            want.push((id, scored));
        }
    };
    add("<|im_start|>system\nS<|im_end|>\n", false);
    add("<|im_start|>user\nhi<|im_end|>\n", false);
    add("<|im_start|>assistant\n", false);
    add("yo<|im_end|>", true);
    add("\n", false);
    add("<|im_start|>user\nok?<|im_end|>\n", false);
    add("<|im_start|>assistant\n", false);
    add("ok<|im_end|>", true);
    add("\n", false);
    let (ids, scored): (Vec<u32>, Vec<bool>) = want.into_iter().unzip();
    assert_eq!(ct.ids, ids);
    assert_eq!(ct.scored, scored);
    let n = ids.len();
    assert_eq!(n, 62);
    // Next-token targets: position i predicts token i+1 where that token is scored.
    let (x, y, cut) = ct.targets(1000);
    assert!(!cut);
    assert_eq!(x, ids[..n - 1].to_vec());
    let scored_targets: Vec<i32> = y.iter().copied().filter(|&t| t >= 0).collect();
    assert_eq!(scored_targets, vec!['y' as i32, 'o' as i32, IM_END as i32, 'o' as i32, 'k' as i32, IM_END as i32]);
    assert_eq!(y[31], 'y' as i32, "position 31 (the newline after `assistant`) predicts the first assistant token");
    // Cut at 50 inputs: the first turn is kept, the second lost.
    let (x, y, cut) = ct.targets(50);
    assert!(cut);
    assert_eq!((x.len(), y.len()), (50, 50));
    assert_eq!(y.iter().filter(|&&t| t >= 0).count(), 3);
}

#[test]
fn a_template_that_is_not_prefix_stable_is_refused_naming_the_message() {
    // Marks the last message, so the conversation before a turn renders differently from its prefix.
    let tmpl = "{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m.role }}:{{ m.content }};{% endfor %}\
                {% if add_generation_prompt %}assistant:{% endif %}";
    let conv = [msg("user", "hi"), msg("assistant", "yo")];
    let e = toy_tokens(tmpl, &conv).unwrap_err().to_string();
    assert!(e.contains("not prefix-stable at message 2"), "{e}");
    // A template that fails for a conversation says so.
    let e = toy_tokens("{{ raise_exception('no system role') }}", &conv).unwrap_err().to_string();
    assert!(e.contains("no system role"), "{e}");
    // An end-of-turn token missing from the template: the whole span after the generation prompt is scored.
    let plain = "{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";
    let ct = toy_tokens(plain, &conv).unwrap();
    let scored: String =
        ct.ids.iter().zip(&ct.scored).filter(|(_, &s)| s).map(|(&i, _)| char::from_u32(i).unwrap()).collect();
    assert_eq!(scored, "yo;");
}

#[test]
fn smollm2_scores_each_assistant_turn_and_its_im_end_only() {
    let Some(path) = smollm2() else { return };
    let f = rime_io::GgufFile::open(&path).unwrap();
    let tok = f.tokenizer().unwrap();
    let mc = f.model_config().unwrap();
    let t = ChatTemplate::from_parts(&tok, f.chat_template(), mc.bos_token_id, &mc.eos_token_id, &path).unwrap();
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    assert!(t.end_of_turn.contains(&im_end));
    let answers = ["A GGUF file holds a model's tensors and metadata.", "Yes: `rime train --task causal-lm`."];
    for conv in [
        vec![
            msg("user", "What is a GGUF file?"),
            msg("assistant", answers[0]),
            msg("user", "Can rime train on one?"),
            msg("assistant", answers[1]),
        ],
        vec![
            msg("system", "Answer briefly."),
            msg("user", "What is a GGUF file?"),
            msg("assistant", answers[0]),
            msg("user", "Can rime train on one?"),
            msg("assistant", answers[1]),
        ],
    ] {
        let ct = t.tokens(&tok, &conv).unwrap();
        assert_eq!(ct.ids, tok.encode(&t.render(&conv, false).unwrap(), false).unwrap());
        // The scored tokens form one run per assistant turn: its content, then <|im_end|>; the newline after
        // it is not scored.
        let mut runs: Vec<(usize, usize)> = vec![];
        for (i, &s) in ct.scored.iter().enumerate() {
            match runs.last_mut() {
                Some((_, e)) if s && *e == i => *e = i + 1,
                _ if s => runs.push((i, i + 1)),
                _ => {}
            }
        }
        assert_eq!(runs.len(), 2, "{runs:?}");
        for ((s, e), a) in runs.iter().zip(answers) {
            assert_eq!(tok.decode(&ct.ids[*s..*e], false).unwrap(), format!("{a}<|im_end|>"));
            assert_eq!(ct.ids[e - 1], im_end);
            assert_eq!(tok.decode(&ct.ids[*e..e + 1], false).unwrap(), "\n");
            assert!(tok.decode(&ct.ids[..*s], false).unwrap().ends_with("<|im_start|>assistant\n"));
        }
        // Without a system message SmolLM2's template writes its default one, unscored.
        let text = tok.decode(&ct.ids[..runs[0].0], false).unwrap();
        assert!(text.starts_with("<|im_start|>system\n"), "{text}");
    }
}

/// Chat data with a bad row at `line` (after good rows and a blank line) is refused naming the file and line.
#[test]
fn bad_chat_rows_are_refused_with_file_and_line() {
    let d = tmp("bad");
    let good = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}"#;
    let cases = [
        (r#"{"messages": [{"content": "Hi"}, {"role": "assistant", "content": "Hello."}]}"#, "message 1 has no `role`"),
        (r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}"#, "message 2 has no `content`"),
        (
            r#"{"messages": [{"role": "tool", "content": "Hi"}, {"role": "assistant", "content": "x"}]}"#,
            "unknown role `tool`",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]}"#,
            "message 2: the assistant turn is empty",
        ),
        (
            r#"{"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]}"#,
            "no assistant message",
        ),
        (r#"{"messages": []}"#, "no messages"),
        (r#"{"messages": [{"role": "user", "content": ["Hi"]}]}"#, "`content` holds [\"Hi\"], expected a string"),
        (r#"{"messages": "Hi"}"#, "expected a list of messages"),
        (r#"{"text": "Hi"}"#, "no `messages` field"),
        (r#"{"messages": [{"role": "user""#, "not valid JSON"),
    ];
    for (i, (bad, want)) in cases.iter().enumerate() {
        let p = d.join(format!("case{i}.jsonl"));
        std::fs::write(&p, format!("{good}\n\n{good}\n{bad}\n{good}\n")).unwrap();
        let e = CausalData::from_file(&p, &Columns::default()).unwrap_err().to_string();
        assert!(e.contains(&format!("{}: line 4: ", p.display())) && e.contains(want), "case {i}: {e}");
    }
    // In memory: the conversation's index is its line.
    let e = CausalData::chat(vec![vec![msg("user", "a"), msg("assistant", "b")], vec![msg("user", "a")]]).unwrap_err();
    assert!(e.to_string().contains("line 2: the conversation has no assistant message"), "{e}");
    // Detected by the first row; another field name through chat_from_file.
    let p = d.join("ok.jsonl");
    std::fs::write(&p, format!("{good}\n{good}\n")).unwrap();
    let c = CausalData::from_file(&p, &Columns::default()).unwrap();
    assert_eq!(c.conversations.as_ref().unwrap()[1], vec![msg("user", "Hi"), msg("assistant", "Hello.")]);
    let p = d.join("conv.jsonl");
    std::fs::write(&p, good.replace("messages", "conversation")).unwrap();
    assert_eq!(CausalData::chat_from_file(&p, "conversation").unwrap().len(), 1);
    let e = CausalData::chat_from_file(&p, "messages").unwrap_err().to_string();
    assert!(e.contains("line 1: no `messages` field"), "{e}");
    std::fs::remove_dir_all(&d).ok();
}

fn lora() -> LoraConfig {
    LoraConfig { rank: 8, alpha: 16.0, targets: vec!["q_proj".into(), "v_proj".into()], ..LoraConfig::default() }
}

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel)
}

/// A conversation longer than max_length is refused naming its file, line and length; allowed truncation cuts
/// it and counts it.
#[test]
fn a_conversation_longer_than_max_length_is_refused_or_cut() {
    let Some(gguf) = smollm2() else { return };
    let d = tmp("long");
    let p = d.join("long.jsonl");
    let short = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}"#;
    let long = serde_json::json!({"messages": [
        {"role": "user", "content": "Tell me about rime."},
        {"role": "assistant", "content": "rime fine-tunes and merges transformers on any GPU that wgpu reaches. ".repeat(4)},
    ]});
    std::fs::write(&p, format!("{short}\n{long}\n")).unwrap();
    let cfg = TrainConfig { max_length: 48, batch_size: 2, max_steps: Some(1), ..TrainConfig::default() };
    let dev = common::dev();
    let data = CausalData::from_file(&p, &Columns::default()).unwrap();
    let mut task = CausalTask::new(dev, &gguf, lora(), data.clone(), None);
    let Err(e) = rime_peft::train(&mut task, &cfg, None, &mut |_| {}) else { panic!("a long conversation is refused") };
    let e = e.to_string();
    assert!(e.contains(&format!("{}: line 2: the conversation is", p.display())), "{e}");
    assert!(e.contains("longer than max_length 48"), "{e}");
    let mut warned = vec![];
    let mut task = CausalTask::new(dev, &gguf, lora(), data.truncating(true), None);
    let run = rime_peft::train(&mut task, &cfg, None, &mut |e| {
        if let Event::Warn(w) = e {
            warned.push(w)
        }
    })
    .unwrap();
    assert_eq!(run.summary.truncated, 1);
    assert!(warned.iter().any(|w| w.contains("1 of 2 examples are longer than max_length 48")), "{warned:?}");
    std::fs::remove_dir_all(&d).ok();
}

/// A few steps of LoRA on conversations of data/rime_chat: the assistant-token loss falls.
#[test]
fn lora_on_rime_chat_lowers_the_assistant_loss() {
    let Some(gguf) = smollm2() else { return };
    let all = CausalData::from_file(repo("data/rime_chat/train.jsonl"), &Columns::default()).unwrap();
    let convs = all.conversations.clone().unwrap();
    assert_eq!(convs.len(), 180);
    let data = CausalData::chat(convs[..8].to_vec()).unwrap();
    let cfg = TrainConfig { epochs: 3, batch_size: 4, lr: 3e-3, max_length: 256, ..TrainConfig::default() };
    let mut task = CausalTask::new(common::dev(), &gguf, lora(), data, None);
    let run = rime_peft::train(&mut task, &cfg, None, &mut |_| {}).unwrap();
    let losses: Vec<f64> = run.log.iter().filter_map(|l| l.get("loss")?.as_f64()).collect();
    eprintln!("assistant-token loss per step: {losses:?}");
    assert_eq!(losses.len(), 6, "{losses:?}");
    let first = (losses[0] + losses[1]) / 2.0;
    let last = (losses[4] + losses[5]) / 2.0;
    assert!(last < 0.8 * first, "the assistant loss should fall over 3 epochs of 8 conversations: {losses:?}");
}
