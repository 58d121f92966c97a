//! Text as a reader sees it: whitespace collapsed, enumeration markers and
//! question numbers removed, hidden and script text left out, images read
//! by their alt text, and the filler that introduces options ("Select one:")
//! told apart from a question.

use scraper::{ElementRef, Node};

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

/// A question's text without its number and the "required" asterisk that
/// form builders append.
pub fn question_text(s: &str) -> String {
    let t = clean(s);
    let t = t.trim_end_matches(|c: char| c == '*' || c.is_whitespace());
    // "1.What is ..." where the number and the text are adjacent spans.
    let digits = t.chars().take_while(char::is_ascii_digit).count();
    let mut rest = t[digits..].chars();
    if (1..=3).contains(&digits)
        && matches!(rest.next(), Some('.') | Some(')'))
        && rest.next().is_some_and(char::is_alphabetic)
    {
        return t[digits + 1..].to_owned();
    }
    strip_number(t)
}

/// Elements whose content a reader never sees as text.
fn invisible(e: &scraper::node::Element) -> bool {
    matches!(
        e.name(),
        "script" | "style" | "noscript" | "template" | "head" | "svg"
    ) || e.attr("hidden").is_some()
        || e.attr("aria-hidden") == Some("true")
        || e.attr("style").is_some_and(|s| {
            let s = s.replace(' ', "").to_ascii_lowercase();
            s.contains("display:none") || s.contains("visibility:hidden")
        })
}

/// Whether the element or one of its ancestors is hidden from readers.
pub fn hidden(e: ElementRef) -> bool {
    e.ancestors()
        .filter_map(ElementRef::wrap)
        .chain(std::iter::once(e))
        .any(|a| invisible(a.value()))
}

/// Hidden from assistive technology too, not just styled away: a control
/// there is not meant to be answered.
pub fn aria_hidden(e: ElementRef) -> bool {
    std::iter::once(e)
        .chain(e.ancestors().filter_map(ElementRef::wrap))
        .any(|a| {
            a.value().attr("aria-hidden") == Some("true") || a.value().attr("hidden").is_some()
        })
}

fn collect(e: ElementRef, out: &mut String, alts: &mut String) {
    for child in e.children() {
        match child.value() {
            Node::Text(t) => out.push_str(t),
            // A dropdown inside a sentence is not part of the sentence.
            Node::Element(el) if invisible(el) || matches!(el.name(), "select" | "datalist") => {}
            Node::Element(el) => {
                if el.name() == "img" {
                    if let Some(alt) = el.attr("alt") {
                        alts.push(' ');
                        alts.push_str(alt);
                    }
                }
                if matches!(el.name(), "br" | "p" | "div" | "li" | "td" | "th") {
                    out.push(' ');
                }
                if let Some(c) = ElementRef::wrap(child) {
                    collect(c, out, alts);
                }
            }
            _ => {}
        }
    }
}

/// The visible text of an element, or the alt text of its images when it
/// has no text (image options).
pub fn text_of(e: ElementRef) -> String {
    let (mut text, mut alts) = (String::new(), String::new());
    collect(e, &mut text, &mut alts);
    let text = clean(&text);
    if text.is_empty() {
        clean(&alts)
    } else {
        text
    }
}

/// Text that introduces the options or states a rule rather than asking
/// the question ("Select one:", "Question 3", "Required to answer").
pub fn is_filler(t: &str) -> bool {
    let l = t.to_lowercase();
    let l = l.trim_end_matches(['.', ':', '*', ' ']);
    let words = l.split_whitespace().count();
    t.chars().count() < 4
        || (t.ends_with(':') && t.len() < 40)
        || [
            "select one",
            "choose one",
            "select all",
            "choose all",
            "pick one",
            "check all",
            "required",
            "single choice",
            "multiple choice",
            "group of answer",
            "answer choices",
            "answer options",
            "possible answers",
        ]
        .iter()
        .any(|p| l.starts_with(p) && words <= 6)
        || matches!(l, "answers" | "options" | "choices" | "your answer")
        || (["question", "frage", "pregunta"]
            .iter()
            .any(|p| l.starts_with(p))
            && words <= 3)
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
        assert_eq!(question_text("3. Your age? *"), "Your age?");
        assert_eq!(question_text("1.What is Na?"), "What is Na?");
        assert_eq!(question_text("2.5 is what?"), "2.5 is what?");
    }

    #[test]
    fn filler_is_told_apart_from_questions() {
        for f in [
            "Select one:",
            "Question 3",
            "Required to answer. Single choice.",
            "Choose one",
            "Frage 2",
        ] {
            assert!(is_filler(f), "{f}");
        }
        for q in [
            "Which planet is largest?",
            "Question the premise: is 1 prime?",
        ] {
            assert!(!is_filler(q), "{q}");
        }
    }
}
