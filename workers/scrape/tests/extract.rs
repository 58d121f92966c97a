//! Extraction on the shared fixture pages (exactly what expected.json
//! says, `correct` only where the page states it), on the platform corpus
//! in `fixtures/platforms/` (one page per quiz platform's markup, each with
//! its expected.json), on our own pages in other markup styles, and on
//! generated pages over and under the caps.

use std::path::Path;
use std::time::Instant;

use serde_json::Value;
use stevedore_handler::JobError;
use stevedore_scrape::extract::{extract, ExtractError, MAX_OPTIONS, MAX_QUESTIONS};
use stevedore_scrape::payload::Selectors;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/quiz");
const PLATFORMS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/platforms");

fn expected() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(format!("{ROOT}/expected.json")).expect("expected.json"),
    )
    .expect("json")
}

fn page(name: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{name}")).expect("fixture")
}

fn questions(html: &str) -> Vec<stevedore_scrape::Question> {
    extract(html, None).expect("within the caps").questions
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn check_fixture(name: &str, page_states_answers: bool) {
    let want = &expected()[name]["questions"];
    let got = questions(&page(name));
    let want = want.as_array().expect("questions");
    assert_eq!(got.len(), want.len(), "{name}: {got:#?}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.text, w["text"].as_str().expect("text"), "{name}");
        assert_eq!(g.options, strings(&w["options"]), "{name}");
        let correct = w["correct"].as_u64().map(|c| c as usize);
        assert_eq!(
            g.correct,
            if page_states_answers { correct } else { None },
            "{name}: correct only when stated"
        );
    }
}

#[test]
fn moodle_page_gives_exactly_the_expected_questions() {
    check_fixture("moodle-multichoice.html", false);
}

#[test]
fn json_ld_page_gives_the_questions_and_the_stated_answers() {
    check_fixture("jsonld-quiz.html", true);
    let found = extract(&page("jsonld-quiz.html"), None).expect("extract");
    assert_eq!(found.method, "json-ld");
}

#[test]
fn script_rendered_page_has_no_questions_without_a_browser() {
    assert!(questions(&page("spa-rendered.html")).is_empty());
}

/// Every page of the platform corpus gives exactly its expected.json:
/// questions in page order, their options, how each was found, and the
/// warnings it names. Prints one line per page before judging them all.
#[test]
fn platform_corpus_gives_exactly_the_expected_questions() {
    let mut dirs: Vec<_> = std::fs::read_dir(PLATFORMS)
        .expect("platforms dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 15, "the corpus has {} pages", dirs.len());
    let mut failures = Vec::new();
    println!("{:<16} {:>5} {:>8}  method", "fixture", "found", "expected");
    for dir in &dirs {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("?");
        let read = |f: &str| std::fs::read_to_string(Path::new(dir).join(f)).expect(f);
        let want: Value = serde_json::from_str(&read("expected.json")).expect("json");
        let want_q = want["questions"].as_array().expect("questions");
        let got = match extract(&read("page.html"), None) {
            Ok(got) => got,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        let good = got
            .questions
            .iter()
            .zip(want_q)
            .filter(|(g, w)| {
                g.text == w["text"].as_str().unwrap_or_default()
                    && g.options == strings(&w["options"])
                    && g.method == w["method"].as_str().unwrap_or_default()
            })
            .count();
        println!("{name:<16} {:>5} {:>8}  {}", good, want_q.len(), got.method);
        if good != want_q.len() || got.questions.len() != want_q.len() {
            failures.push(format!("{name}: got {:#?}", got.questions));
        }
        for w in strings(&want["warnings"]) {
            if !got.warnings.iter().any(|g| g.contains(w)) {
                failures.push(format!("{name}: no warning {w:?} in {:?}", got.warnings));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn aria_radio_groups_are_understood() {
    let html = include_str!("fixtures/aria-radiogroup.html");
    let q = questions(html);
    assert_eq!(q.len(), 2);
    assert_eq!(q[0].text, "Which planet is closest to the Sun?");
    assert_eq!(q[0].options, ["Venus", "Mercury", "Mars"]);
    assert_eq!(q[1].text, "How many moons does Mars have?");
    assert_eq!(q[1].options, ["One", "Two"]);
}

#[test]
fn fieldsets_with_checkboxes_and_wrapping_labels_are_understood() {
    let html = include_str!("fixtures/fieldset-checkboxes.html");
    let q = questions(html);
    assert_eq!(q.len(), 2, "{q:#?}");
    assert_eq!(q[0].text, "Which of these are prime numbers?");
    assert_eq!(q[0].options, ["2", "4", "7"]);
    assert_eq!(
        q[1].text, "Water boils at sea level at …",
        "a 'Choose one:' legend is not the question"
    );
    assert_eq!(q[1].options, ["90 °C", "100 °C"]);
}

#[test]
fn options_without_a_question_are_left_out_with_a_warning() {
    let html = r#"<form><input type="radio" name="x" value="1"><label>A</label>
        <input type="radio" name="x" value="2"><label>B</label></form>"#;
    let found = extract(html, None).expect("extract");
    assert!(found.questions.is_empty(), "{:#?}", found.questions);
    assert!(
        found.warnings[0].contains("2 radio options without a question"),
        "{:?}",
        found.warnings
    );
}

#[test]
fn custom_selectors_override_the_built_in_extractors() {
    let html = r#"<div class="card"><b class="ask">Two plus two?</b><i class="opt">3</i><i class="opt">4</i></div>
                  <div class="card"><b class="ask">Capital of France?</b><i class="opt">a) Paris</i><i class="opt">b) Rome</i></div>"#;
    let s = Selectors {
        question: ".card".into(),
        text: ".ask".into(),
        option: ".opt".into(),
    };
    let found = extract(html, Some(&s)).expect("extract");
    assert_eq!(found.questions.len(), 2);
    assert_eq!(found.questions[1].options, ["Paris", "Rome"]);
    assert_eq!(found.method, "selectors");
}

/// `groups` questions of `per` radios each, Moodle-style (a hidden input
/// beside every radio, a label per option), as one page.
fn generated(groups: usize, per: usize, hidden_per_group: usize) -> String {
    let mut html = String::from("<!DOCTYPE html><html><head><title>Big</title></head><body><form>");
    for g in 0..groups {
        html.push_str(&format!(
            "<div class=\"que\"><div class=\"qtext\"><p>Generated question {g}?</p></div><div class=\"answer\">"
        ));
        for h in 0..hidden_per_group {
            html.push_str(&format!(
                "<input type=\"hidden\" name=\"q{g}_seq{h}\" value=\"1\">"
            ));
        }
        for o in 0..per {
            html.push_str(&format!(
                "<div><input type=\"radio\" name=\"q{g}\" id=\"q{g}_{o}\" value=\"{o}\"><label for=\"q{g}_{o}\">Option {o} of {g}</label></div>"
            ));
        }
        html.push_str("</div></div>");
    }
    html.push_str("</form></body></html>");
    html
}

#[test]
fn a_page_with_100000_radios_is_refused_as_over_the_cap() {
    let html = generated(25_000, 4, 0);
    let started = Instant::now();
    let refused = extract(&html, None);
    println!(
        "100,000 radios ({} bytes): {:?} in {:?}",
        html.len(),
        refused.as_ref().err(),
        started.elapsed()
    );
    assert!(matches!(
        refused,
        Err(ExtractError::TooManyTags { max: 40_000 })
    ));
    let job: JobError = refused.expect_err("refused").into();
    assert!(!job.is_retryable(), "a page over a cap stays over it");
    assert!(
        job.to_string()
            .contains("more than 40000 input and option tags"),
        "{job}"
    );
}

#[test]
fn a_page_with_10000_inputs_in_150_groups_extracts_every_group() {
    // 150 questions of 40 radios and 27 hidden inputs: 10,050 inputs.
    let html = generated(150, 40, 27);
    let started = Instant::now();
    let found = extract(&html, None).expect("within the caps");
    println!(
        "10,050 inputs in 150 groups ({} bytes): {} questions in {:?}",
        html.len(),
        found.questions.len(),
        started.elapsed()
    );
    assert_eq!(found.questions.len(), 150);
    for (g, q) in found.questions.iter().enumerate() {
        assert_eq!(q.text, format!("Generated question {g}?"));
        assert_eq!(q.options.len(), 40);
        assert_eq!(q.options[39], format!("Option 39 of {g}"));
    }
}

#[test]
fn pages_over_the_question_option_and_length_caps_are_refused() {
    let too_many = extract(&generated(MAX_QUESTIONS + 1, 2, 0), None);
    assert!(
        matches!(too_many, Err(ExtractError::TooManyQuestions { max: 200 })),
        "{too_many:?}"
    );
    assert!(extract(&generated(MAX_QUESTIONS, 2, 0), None).is_ok());
    // Under the tag count, over the controls a page may hold.
    let crowded = extract(&generated(3_000, 4, 0), None);
    assert!(
        matches!(crowded, Err(ExtractError::TooManyInputs { max: 10_000 })),
        "{crowded:?}"
    );
    let wide = extract(&generated(1, MAX_OPTIONS + 1, 0), None);
    assert!(
        matches!(
            wide,
            Err(ExtractError::TooManyOptions {
                question: 1,
                found: 51,
                max: 50
            })
        ),
        "{wide:?}"
    );
    let long_q = generated(1, 2, 0).replace("Generated question 0?", &"why ".repeat(600));
    assert!(matches!(
        extract(&long_q, None),
        Err(ExtractError::QuestionTooLong {
            question: 1,
            max: 2000,
            ..
        })
    ));
    let long_o = generated(1, 2, 0).replace("Option 1 of 0", &"x".repeat(501));
    assert!(matches!(
        extract(&long_o, None),
        Err(ExtractError::OptionTooLong {
            question: 1,
            len: 501,
            max: 500
        })
    ));
}
