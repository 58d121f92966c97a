//! Question extraction from HTML that works on pages we have not seen:
//! schema.org Quiz/Question JSON-LD first (it can state the right answer),
//! then groups of radio buttons or checkboxes by name with their labels and
//! the nearest question-like text before them, and ARIA radio groups. A
//! payload may bring its own CSS selectors instead.

use std::collections::HashMap;

use scraper::{ElementRef, Html, Selector};
use serde_json::Value;

use crate::payload::{Question, Selectors};

/// What a page yields.
#[derive(Debug, Clone, PartialEq)]
pub struct Extracted {
    pub title: String,
    pub questions: Vec<Question>,
}

fn sel(s: &str) -> Selector {
    // Only called with the literals below, which are valid selectors.
    Selector::parse(s).unwrap_or_else(|_| unreachable!("static selector {s}"))
}

/// Collapses whitespace.
pub fn clean(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Removes an enumeration prefix such as `a. `, `B) `, `3. ` or `(c) `.
pub fn strip_marker(s: &str) -> String {
    let t = clean(s);
    let chars: Vec<char> = t.chars().collect();
    let rest = |n: usize| {
        chars[n..]
            .iter()
            .collect::<String>()
            .trim_start()
            .to_owned()
    };
    let spaced = |n: usize| chars.get(n).is_some_and(|c| c.is_whitespace());
    let marker = |c: char| c.is_ascii_alphabetic() || c.is_ascii_digit();
    // "(c) text"
    if chars.first() == Some(&'(') {
        if let Some(close) = chars.iter().position(|c| *c == ')') {
            if (2..=3).contains(&close)
                && chars[1..close].iter().all(|c| marker(*c))
                && spaced(close + 1)
            {
                return rest(close + 1);
            }
        }
    }
    // "a. text", "B) text", "12. text"
    let digits = chars.iter().take_while(|c| c.is_ascii_digit()).count();
    let lead = if chars.first().is_some_and(|c| c.is_ascii_alphabetic()) {
        1
    } else {
        digits.min(2)
    };
    if lead > 0
        && (lead == 1 || digits == lead)
        && matches!(chars.get(lead), Some('.') | Some(')'))
        && spaced(lead + 1)
    {
        return rest(lead + 1);
    }
    t
}

/// Removes a question number such as `3. ` or `12) `; letters are left
/// alone, since a question may well start with "A. Smith wrote ...".
pub fn strip_number(s: &str) -> String {
    if s.starts_with(|c: char| c.is_ascii_digit()) {
        strip_marker(s)
    } else {
        s.to_owned()
    }
}

fn text_of(e: ElementRef) -> String {
    clean(&e.text().collect::<String>())
}

pub fn extract(html: &str, selectors: Option<&Selectors>) -> Extracted {
    let doc = Html::parse_document(html);
    let title = doc
        .select(&sel("title"))
        .next()
        .map(text_of)
        .unwrap_or_default();
    let mut questions = match selectors {
        Some(s) => by_selectors(&doc, s),
        None => {
            let ld = json_ld(&doc);
            if ld.is_empty() {
                form_groups(&doc)
            } else {
                ld
            }
        }
    };
    for q in &mut questions {
        q.text = strip_number(&q.text);
    }
    Extracted { title, questions }
}

fn by_selectors(doc: &Html, s: &Selectors) -> Vec<Question> {
    let (Ok(q), Ok(t), Ok(o)) = (
        Selector::parse(&s.question),
        Selector::parse(&s.text),
        Selector::parse(&s.option),
    ) else {
        return vec![];
    };
    doc.select(&q)
        .filter_map(|el| {
            let text = el.select(&t).next().map(text_of)?;
            let options: Vec<String> = el
                .select(&o)
                .map(|e| strip_marker(&text_of(e)))
                .filter(|s| !s.is_empty())
                .collect();
            (!text.is_empty() && options.len() >= 2).then_some(Question {
                text,
                options,
                correct: None,
            })
        })
        .collect()
}

fn json_ld(doc: &Html) -> Vec<Question> {
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

fn collect_ld(v: &Value, out: &mut Vec<Question>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| collect_ld(x, out)),
        Value::Object(o) if is_type(v, "Question") => {
            let text = clean(
                v["text"]
                    .as_str()
                    .or_else(|| v["name"].as_str())
                    .unwrap_or_default(),
            );
            // (position, text, accepted)
            let mut answers: Vec<(Option<i64>, String, bool)> = Vec::new();
            for (key, accepted) in [("suggestedAnswer", false), ("acceptedAnswer", true)] {
                for a in as_list(&v[key]) {
                    let t = clean(
                        a["text"]
                            .as_str()
                            .or_else(|| a["name"].as_str())
                            .unwrap_or_default(),
                    );
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
                });
            }
            let _ = o;
        }
        Value::Object(o) => o.values().for_each(|x| collect_ld(x, out)),
        _ => {}
    }
}

/// Text that introduces the options rather than asking the question.
fn is_filler(t: &str) -> bool {
    let l = t.to_ascii_lowercase();
    t.len() < 4
        || (t.ends_with(':') && t.len() < 40)
        || l.starts_with("select one")
        || l.starts_with("choose one")
        || (l.starts_with("question") && l.split_whitespace().count() <= 3)
}

fn is_question_like(e: ElementRef) -> bool {
    let name = e.value().name();
    let class = e
        .value()
        .attr("class")
        .unwrap_or_default()
        .to_ascii_lowercase();
    matches!(
        name,
        "legend" | "h1" | "h2" | "h3" | "h4" | "h5" | "h6" | "p"
    ) || ["qtext", "question", "stem", "prompt-text"]
        .iter()
        .any(|c| class.contains(c))
}

/// Radio/checkbox groups by name and ARIA radio groups, in page order.
fn form_groups(doc: &Html) -> Vec<Question> {
    let labels: HashMap<&str, ElementRef> = doc
        .select(&sel("label[for]"))
        .filter_map(|l| Some((l.value().attr("for")?, l)))
        .collect();
    let input_sel = sel(r#"input[type="radio"], input[type="checkbox"]"#);
    let mut groups: Vec<(String, Vec<ElementRef>)> = Vec::new();
    for input in doc.select(&input_sel) {
        let Some(name) = input.value().attr("name") else {
            continue;
        };
        match groups.iter_mut().find(|g| g.0 == name) {
            Some(g) => g.1.push(input),
            None => groups.push((name.to_owned(), vec![input])),
        }
    }
    let mut out: Vec<(usize, Question)> = Vec::new();
    let order: HashMap<ego_tree::NodeId, usize> = doc
        .root_element()
        .descendants()
        .enumerate()
        .map(|(i, n)| (n.id(), i))
        .collect();
    for (name, inputs) in &groups {
        let options: Vec<String> = inputs
            .iter()
            .map(|i| {
                let by_for = i
                    .value()
                    .attr("id")
                    .and_then(|id| labels.get(id))
                    .map(|l| text_of(*l));
                let wrapping = || {
                    i.ancestors()
                        .filter_map(ElementRef::wrap)
                        .find(|a| a.value().name() == "label")
                        .map(text_of)
                };
                strip_marker(&by_for.or_else(wrapping).unwrap_or_default())
            })
            .collect();
        if options.len() < 2 || options.iter().any(String::is_empty) {
            continue;
        }
        let first = inputs[0];
        // The widest ancestor that holds this group's inputs and no other's.
        let mut scope = first;
        for a in first.ancestors().filter_map(ElementRef::wrap) {
            let only_ours = a
                .select(&input_sel)
                .all(|i| i.value().attr("name") == Some(name.as_str()));
            if !only_ours {
                break;
            }
            scope = a;
        }
        let mut text = None;
        for node in scope.descendants() {
            if node.id() == first.id() {
                break;
            }
            let Some(el) = ElementRef::wrap(node) else {
                continue;
            };
            let in_label = el
                .ancestors()
                .filter_map(ElementRef::wrap)
                .any(|a| a.value().name() == "label");
            if !is_question_like(el) || in_label || el.select(&input_sel).next().is_some() {
                continue;
            }
            let t = text_of(el);
            if !is_filler(&t) {
                text = Some(t);
            }
        }
        if let Some(text) = text {
            let pos = order.get(&first.id()).copied().unwrap_or_default();
            out.push((
                pos,
                Question {
                    text,
                    options,
                    correct: None,
                },
            ));
        }
    }
    out.extend(aria_groups(doc, &order));
    out.sort_by_key(|q| q.0);
    out.into_iter().map(|q| q.1).collect()
}

fn aria_groups(doc: &Html, order: &HashMap<ego_tree::NodeId, usize>) -> Vec<(usize, Question)> {
    let by_id: HashMap<&str, ElementRef> = doc
        .select(&sel("[id]"))
        .filter_map(|e| Some((e.value().attr("id")?, e)))
        .collect();
    let radio = sel(r#"[role="radio"]"#);
    let native = sel("input");
    doc.select(&sel(r#"[role="radiogroup"]"#))
        .filter(|g| g.select(&native).next().is_none())
        .filter_map(|g| {
            let labelled = g.value().attr("aria-labelledby").map(|ids| {
                ids.split_whitespace()
                    .filter_map(|id| by_id.get(id))
                    .map(|e| text_of(*e))
                    .collect::<Vec<_>>()
                    .join(" ")
            });
            let text =
                clean(&labelled.or_else(|| g.value().attr("aria-label").map(str::to_owned))?);
            let options: Vec<String> = g
                .select(&radio)
                .map(|r| {
                    strip_marker(
                        &r.value()
                            .attr("aria-label")
                            .map(str::to_owned)
                            .unwrap_or_else(|| text_of(r)),
                    )
                })
                .filter(|o| !o.is_empty())
                .collect();
            let pos = order.get(&g.id()).copied().unwrap_or_default();
            (!text.is_empty() && options.len() >= 2).then_some((
                pos,
                Question {
                    text,
                    options,
                    correct: None,
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_stripped_but_answers_that_look_like_them_are_kept() {
        assert_eq!(strip_marker("a. The median"), "The median");
        assert_eq!(strip_marker("B)  Two  words"), "Two words");
        assert_eq!(strip_marker("(c) Third"), "Third");
        assert_eq!(strip_marker("12. Twelfth"), "Twelfth");
        assert_eq!(strip_marker("256"), "256");
        assert_eq!(strip_marker("0.45"), "0.45");
        assert_eq!(strip_marker("1/3"), "1/3");
        assert_eq!(strip_marker("A"), "A");
        assert_eq!(
            strip_number("1. In simple regression"),
            "In simple regression"
        );
        assert_eq!(strip_number("A. Smith wrote it?"), "A. Smith wrote it?");
        assert_eq!(strip_number("2.5 is what?"), "2.5 is what?");
    }
}
