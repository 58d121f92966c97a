//! Question extraction from HTML that works on pages we have not seen:
//! schema.org Quiz/Question JSON-LD first (it can state the right answer),
//! then every kind of choice control (radios, checkboxes, ARIA radios,
//! checkboxes and listbox options, dropdowns) grouped into questions and
//! tied to their question text. A payload may bring its own CSS selectors
//! instead. Each question records how it was found (`method`) and the
//! result lists where a heuristic guessed (`warnings`).
//!
//! Pages are untrusted, so extraction is linear in the page's elements
//! (one [`index`] pass, no per-group rescans) and refuses pages over the
//! caps below with an [`ExtractError`], a permanent job error.
//!
//! - [`text`]: whitespace, markers, visible text, filler.
//! - [`jsonld`]: schema.org JSON-LD.
//! - [`index`]: the one pass over the document.
//! - [`options`]: what an option is, its text, its group.
//! - [`question`]: what ties a question's text to its options.

mod index;
mod jsonld;
mod options;
mod question;
pub mod text;

use std::collections::{BTreeSet, HashMap};

use scraper::{Html, Selector};
use stevedore_handler::JobError;

pub use crate::payload::Question;
use crate::payload::Selectors;
pub use text::{clean, strip_marker, strip_number};

/// Questions one page may yield.
pub const MAX_QUESTIONS: usize = 200;
/// Options one question may have (a dropdown of every country is over).
pub const MAX_OPTIONS: usize = 50;
/// Characters in a question's text: a long stem with a short passage.
pub const MAX_QUESTION_CHARS: usize = 2_000;
/// Characters in one option's text.
pub const MAX_OPTION_CHARS: usize = 500;
/// Option-like elements one page may hold: every question full.
pub const MAX_INPUTS: usize = MAX_QUESTIONS * MAX_OPTIONS;
/// `<input` and `<option` tags counted in the raw HTML before parsing,
/// hidden inputs included: parsing a page this size costs seconds.
pub const MAX_TAGS: usize = 4 * MAX_INPUTS;

/// A page over one of the caps. Permanent: loading it again gives the same
/// page.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtractError {
    #[error("the page has more than {max} input and option tags")]
    TooManyTags { max: usize },
    #[error("the page has more than {max} answer controls")]
    TooManyInputs { max: usize },
    #[error("the page has more than {max} questions")]
    TooManyQuestions { max: usize },
    #[error("question {question} has {found} options, more than {max}")]
    TooManyOptions {
        question: usize,
        found: usize,
        max: usize,
    },
    #[error("question {question}'s text has {len} characters, more than {max}")]
    QuestionTooLong {
        question: usize,
        len: usize,
        max: usize,
    },
    #[error("an option of question {question} has {len} characters, more than {max}")]
    OptionTooLong {
        question: usize,
        len: usize,
        max: usize,
    },
}

impl From<ExtractError> for JobError {
    fn from(e: ExtractError) -> Self {
        JobError::permanent(format!("page over an extraction limit: {e}"))
    }
}

/// What a page yields.
#[derive(Debug, Clone, PartialEq)]
pub struct Extracted {
    pub title: String,
    pub questions: Vec<Question>,
    /// The distinct methods of the questions, in page order.
    pub method: String,
    /// Where a heuristic guessed, in words a person can check.
    pub warnings: Vec<String>,
}

fn sel(s: &str) -> Selector {
    // Only called with literals, which are valid selectors.
    Selector::parse(s).unwrap_or_else(|_| unreachable!("static selector {s}"))
}

/// Tags that can be answer controls, counted without parsing (std's
/// substring search, fast even in a debug build; mixed-case tags such as
/// `<Input` are not counted, the caps after parsing still hold).
fn control_tags(html: &str) -> usize {
    ["<input", "<INPUT", "<option", "<OPTION"]
        .iter()
        .map(|t| html.matches(t).count())
        .sum()
}

pub fn extract(html: &str, selectors: Option<&Selectors>) -> Result<Extracted, ExtractError> {
    if control_tags(html) > MAX_TAGS {
        return Err(ExtractError::TooManyTags { max: MAX_TAGS });
    }
    let doc = Html::parse_document(html);
    let title = doc
        .select(&sel("title"))
        .next()
        .map(text::text_of)
        .unwrap_or_default();
    let mut warnings = Vec::new();
    let mut questions = match selectors {
        Some(s) => by_selectors(&doc, s),
        None => {
            let ld = jsonld::json_ld(&doc);
            if ld.is_empty() {
                from_controls(&index::Index::build(&doc)?, &mut warnings)?
            } else {
                ld
            }
        }
    };
    for q in &mut questions {
        q.text = text::question_text(&q.text);
    }
    check_caps(&questions)?;
    let mut method: Vec<&str> = Vec::new();
    for q in &questions {
        if !method.contains(&q.method.as_str()) {
            method.push(&q.method);
        }
    }
    Ok(Extracted {
        title,
        method: method.join(", "),
        questions,
        warnings,
    })
}

fn check_caps(questions: &[Question]) -> Result<(), ExtractError> {
    if questions.len() > MAX_QUESTIONS {
        return Err(ExtractError::TooManyQuestions { max: MAX_QUESTIONS });
    }
    for (i, q) in questions.iter().enumerate() {
        let question = i + 1;
        if q.options.len() > MAX_OPTIONS {
            return Err(ExtractError::TooManyOptions {
                question,
                found: q.options.len(),
                max: MAX_OPTIONS,
            });
        }
        let len = q.text.chars().count();
        if len > MAX_QUESTION_CHARS {
            return Err(ExtractError::QuestionTooLong {
                question,
                len,
                max: MAX_QUESTION_CHARS,
            });
        }
        if let Some(len) = q
            .options
            .iter()
            .map(|o| o.chars().count())
            .find(|l| *l > MAX_OPTION_CHARS)
        {
            return Err(ExtractError::OptionTooLong {
                question,
                len,
                max: MAX_OPTION_CHARS,
            });
        }
    }
    Ok(())
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
            let text = el.select(&t).next().map(text::text_of)?;
            let options: Vec<String> = el
                .select(&o)
                // One past the cap is enough for check_caps to refuse.
                .take(MAX_OPTIONS + 1)
                .map(|e| strip_marker(&text::text_of(e)))
                .filter(|s| !s.is_empty())
                .collect();
            (!text.is_empty() && options.len() >= 2).then_some(Question {
                text,
                options,
                correct: None,
                method: "selectors".into(),
            })
        })
        .take(MAX_QUESTIONS + 1)
        .collect()
}

/// Questions from the page's choice controls, in page order.
fn from_controls(
    ix: &index::Index,
    warnings: &mut Vec<String>,
) -> Result<Vec<Question>, ExtractError> {
    let mut used = BTreeSet::new();
    let mut headers = HashMap::new();
    let mut out: Vec<Question> = Vec::new();
    for g in options::groups(ix) {
        if g.opts.len() > MAX_OPTIONS {
            return Err(ExtractError::TooManyOptions {
                question: out.len() + 1,
                found: g.opts.len(),
                max: MAX_OPTIONS,
            });
        }
        let m = options::matrix(ix, &g, &mut headers);
        let (mut texts, mut guesses) = (Vec::new(), Vec::new());
        for (n, i) in g.opts.iter().enumerate() {
            let t = options::option_text(ix, &ix.opts[*i], m.as_ref(), &mut used);
            if t.text.is_empty() || options::is_placeholder(g.kind, &t.text) {
                continue;
            }
            if let Some(guess) = t.guess {
                guesses.push(format!("option {} {guess}", n + 1));
            }
            texts.push(t.text);
        }
        // One checkbox is a consent box, not a question.
        if texts.len() < 2 {
            continue;
        }
        let prev = g.opts[0].checked_sub(1).map(|i| ix.opts[i].pos);
        let Some(found) = question::question(ix, &g, m.as_ref(), prev, &used) else {
            warnings.push(format!(
                "{} {} options without a question were left out (the first says \"{}\")",
                texts.len(),
                g.kind.name(),
                texts[0]
            ));
            continue;
        };
        let n = out.len() + 1;
        if found.guessed {
            warnings.push(format!(
                "question {n}: no label ties its text to the options; used the nearest text before them"
            ));
        }
        warnings.extend(guesses.into_iter().map(|g| format!("question {n}: {g}")));
        out.push(Question {
            text: found.text,
            options: texts,
            correct: None,
            method: format!("{}+{}", g.kind.name(), found.source),
        });
        if out.len() > MAX_QUESTIONS {
            return Err(ExtractError::TooManyQuestions { max: MAX_QUESTIONS });
        }
    }
    Ok(out)
}
