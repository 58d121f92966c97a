//! schema.org `Quiz` / `Question` JSON-LD: the one source that can state
//! the right answer (`acceptedAnswer`), so it wins over the page's form.

use scraper::Html;
use serde_json::Value;

use super::text::{clean, strip_marker};
use super::{sel, Question};

pub fn json_ld(doc: &Html) -> Vec<Question> {
    let mut out = Vec::new();
    for script in doc.select(&sel(r#"script[type="application/ld+json"]"#)) {
        let raw: String = script.text().collect();
        if let Ok(v) = serde_json::from_str::<Value>(&raw) {
            collect_ld(&v, &mut out);
        }
    }
    out
}

fn as_list(v: &Value) -> Vec<&Value> {
    match v {
        Value::Array(a) => a.iter().collect(),
        Value::Null => vec![],
        other => vec![other],
    }
}

fn is_type(v: &Value, t: &str) -> bool {
    as_list(&v["@type"]).iter().any(|x| x.as_str() == Some(t))
}

fn text_field(v: &Value) -> String {
    clean(
        v["text"]
            .as_str()
            .or_else(|| v["name"].as_str())
            .unwrap_or_default(),
    )
}

fn collect_ld(v: &Value, out: &mut Vec<Question>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| collect_ld(x, out)),
        Value::Object(_) if is_type(v, "Question") => {
            let text = text_field(v);
            // (position, text, accepted)
            let mut answers: Vec<(Option<i64>, String, bool)> = Vec::new();
            for (key, accepted) in [("suggestedAnswer", false), ("acceptedAnswer", true)] {
                for a in as_list(&v[key]) {
                    let t = text_field(a);
                    if !t.is_empty() {
                        answers.push((a["position"].as_i64(), strip_marker(&t), accepted));
                    }
                }
            }
            if answers.iter().all(|a| a.0.is_some()) {
                answers.sort_by_key(|a| a.0);
            }
            let accepted: Vec<usize> = answers
                .iter()
                .enumerate()
                .filter(|(_, a)| a.2)
                .map(|(i, _)| i)
                .collect();
            if !text.is_empty() && answers.len() >= 2 {
                out.push(Question {
                    text,
                    options: answers.into_iter().map(|a| a.1).collect(),
                    correct: (accepted.len() == 1).then(|| accepted[0]),
                    method: "json-ld".into(),
                });
            }
        }
        Value::Object(o) => o.values().for_each(|x| collect_ld(x, out)),
        _ => {}
    }
}
