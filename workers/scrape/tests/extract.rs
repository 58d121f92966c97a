//! Extraction on the shared fixture pages (exactly what expected.json
//! says, `correct` only where the page states it) and on our own pages in
//! other markup styles.

use serde_json::Value;
use stevedore_scrape::extract::extract;
use stevedore_scrape::payload::Selectors;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/quiz");

fn expected() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(format!("{ROOT}/expected.json")).expect("expected.json"),
    )
    .expect("json")
}

fn page(name: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{name}")).expect("fixture")
}

fn check_fixture(name: &str, page_states_answers: bool) {
    let want = &expected()[name]["questions"];
    let got = extract(&page(name), None).questions;
    let want = want.as_array().expect("questions");
    assert_eq!(got.len(), want.len(), "{name}: {got:#?}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.text, w["text"].as_str().expect("text"), "{name}");
        let opts: Vec<&str> = w["options"]
            .as_array()
            .expect("options")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(g.options, opts, "{name}");
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
}

#[test]
fn script_rendered_page_has_no_questions_without_a_browser() {
    assert!(extract(&page("spa-rendered.html"), None)
        .questions
        .is_empty());
}

#[test]
fn aria_radio_groups_are_understood() {
    let html = include_str!("fixtures/aria-radiogroup.html");
    let q = extract(html, None).questions;
    assert_eq!(q.len(), 2);
    assert_eq!(q[0].text, "Which planet is closest to the Sun?");
    assert_eq!(q[0].options, ["Venus", "Mercury", "Mars"]);
    assert_eq!(q[1].text, "How many moons does Mars have?");
    assert_eq!(q[1].options, ["One", "Two"]);
}

#[test]
fn fieldsets_with_checkboxes_and_wrapping_labels_are_understood() {
    let html = include_str!("fixtures/fieldset-checkboxes.html");
    let q = extract(html, None).questions;
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
fn custom_selectors_override_the_built_in_extractors() {
    let html = r#"<div class="card"><b class="ask">Two plus two?</b><i class="opt">3</i><i class="opt">4</i></div>
                  <div class="card"><b class="ask">Capital of France?</b><i class="opt">a) Paris</i><i class="opt">b) Rome</i></div>"#;
    let s = Selectors {
        question: ".card".into(),
        text: ".ask".into(),
        option: ".opt".into(),
    };
    let q = extract(html, Some(&s)).questions;
    assert_eq!(q.len(), 2);
    assert_eq!(q[1].options, ["Paris", "Rome"]);
}
