//! What ties a question's text to its options, in the order trusted: the
//! group element's ARIA name (`aria-labelledby`, `aria-label`), its legend
//! or label, a table row's header cell, `aria-describedby`, and otherwise
//! the nearest text before the first option (a heading, an element whose
//! class says it holds the question, or, as a reported guess, any block of
//! text). The backward walk stops at the previous group's last option, so
//! each stretch of the page is read for one group only.

use std::collections::BTreeSet;

use scraper::ElementRef;

use super::index::{Index, Kind};
use super::options::{is_group_element, Group, Matrix};
use super::text::{hidden, is_filler, text_of};

pub struct Found {
    pub text: String,
    pub source: &'static str,
    pub guessed: bool,
}

fn found(text: String, source: &'static str) -> Option<Found> {
    let text = super::text::question_text(&text);
    (!text.is_empty() && !is_filler(&text)).then_some(Found {
        text,
        source,
        guessed: false,
    })
}

/// The group elements around the options that hold no other options,
/// nearest first.
fn containers<'a>(ix: &'a Index, g: &'a Group) -> impl Iterator<Item = ElementRef<'a>> + 'a {
    let first = ix.opts[g.opts[0]].el;
    let last = g.opts.last().map_or(0, |i| ix.opts[*i].pos);
    first
        .ancestors()
        .filter_map(ElementRef::wrap)
        .take_while(move |a| ix.options_in(*a) == g.opts.len() || ix.end_of(*a) < last)
        .filter(move |a| ix.end_of(*a) >= last)
}

fn named(ix: &Index, c: ElementRef) -> Option<Found> {
    let v = c.value();
    let labelled = v
        .attr("aria-labelledby")
        .and_then(|ids| ix.referenced(ids, |t| !is_filler(t)));
    if let Some(f) = labelled.and_then(|t| found(t, "aria-labelledby")) {
        return Some(f);
    }
    if !is_group_element(c) && v.name() != "form" {
        return None;
    }
    if let Some(f) = v
        .attr("aria-label")
        .and_then(|t| found(t.to_owned(), "aria-label"))
    {
        return Some(f);
    }
    if v.name() == "fieldset" {
        let legend = c
            .children()
            .filter_map(ElementRef::wrap)
            .find(|e| e.value().name() == "legend");
        if let Some(f) = legend.and_then(|l| found(text_of(l), "legend")) {
            return Some(f);
        }
    }
    if v.name() == "select" {
        let by_for = v
            .attr("id")
            .and_then(|id| ix.labels_for.get(id))
            .and_then(|ls| ls.first().copied());
        let wrap = || {
            c.ancestors()
                .filter_map(ElementRef::wrap)
                .find(|a| a.value().name() == "label")
        };
        if let Some(f) = by_for
            .or_else(wrap)
            .and_then(|l| found(text_of(l), "label"))
        {
            return Some(f);
        }
    }
    None
}

const BLOCKS: &[&str] = &[
    "p",
    "div",
    "td",
    "th",
    "li",
    "dt",
    "dd",
    "label",
    "section",
    "article",
    "blockquote",
    "pre",
    "figcaption",
    "caption",
    "header",
];
const SKIP: &[&str] = &[
    "script", "style", "noscript", "template", "nav", "footer", "button", "a", "select", "option",
    "input", "textarea", "svg",
];
const QUESTION_CLASSES: &[&str] = &["qtext", "question", "stem", "prompt"];

fn own_class_says(e: ElementRef) -> bool {
    let class = e
        .value()
        .attr("class")
        .unwrap_or_default()
        .to_ascii_lowercase();
    QUESTION_CLASSES.iter().any(|c| class.contains(c))
}

fn class_says_question(e: ElementRef) -> bool {
    std::iter::once(e)
        .chain(e.ancestors().filter_map(ElementRef::wrap).take(2))
        .any(own_class_says)
}

/// The nearest question-like text between `from` (exclusive, the previous
/// group's last option) and the group's first option.
fn before(ix: &Index, first: usize, from: usize, used: &BTreeSet<usize>) -> Option<Found> {
    for i in (from + 1..first).rev() {
        if let Some(f) = inline_run(ix, i, first, used) {
            return Some(f);
        }
        let Some(e) = ElementRef::wrap(ix.nodes[i]) else {
            continue;
        };
        let name = e.value().name();
        // Ancestors of the options, and the previous group's labels.
        if ix.end[i] >= first || SKIP.contains(&name) || used.range(i..=ix.end[i]).next().is_some()
        {
            continue;
        }
        let heading = matches!(name, "h1" | "h2" | "h3" | "h4" | "h5" | "h6" | "legend")
            || e.value().attr("role") == Some("heading");
        let classed = class_says_question(e);
        if !(heading || classed || BLOCKS.contains(&name)) {
            continue;
        }
        let in_used = e
            .ancestors()
            .any(|a| ElementRef::wrap(a).is_some_and(|a| used.contains(&ix.pos(a))));
        if in_used || hidden(e) || ix.options_in(e) > 0 {
            continue;
        }
        // A classed element's text is all of it (`div.qtext` around a code
        // block and a paragraph), not just its last paragraph.
        let e = if classed && !heading {
            std::iter::once(e)
                .chain(e.ancestors().filter_map(ElementRef::wrap))
                .take(3)
                .filter(|a| ix.pos(*a) > from && ix.end_of(*a) < first)
                .filter(|a| own_class_says(*a))
                .last()
                .unwrap_or(e)
        } else {
            e
        };
        let source = match (heading, classed) {
            (true, _) if name == "legend" => "legend",
            (true, _) => "heading",
            (false, true) => "question-class",
            (false, false) => "preceding-text",
        };
        if let Some(mut f) = found(text_of(e), source) {
            f.guessed = source == "preceding-text";
            return Some(f);
        }
    }
    None
}

const INLINE: &[&str] = &[
    "b", "strong", "em", "i", "span", "font", "u", "code", "sub", "sup", "small", "big", "abbr",
    "mark", "q", "cite", "tt", "kbd", "var", "s",
];

fn is_inline(n: ego_tree::NodeRef<scraper::Node>) -> bool {
    match n.value() {
        scraper::Node::Text(_) => true,
        scraper::Node::Element(e) => INLINE.contains(&e.name()),
        _ => false,
    }
}

/// Bare text in the element that also holds the options, up to the last
/// line break before them: `<li>What is 7 × 8?<br><input ...> 54`.
fn inline_run(ix: &Index, i: usize, first: usize, used: &BTreeSet<usize>) -> Option<Found> {
    let node = ix.nodes[i];
    let parent = node.parent()?;
    let holds_options = ElementRef::wrap(parent).is_some_and(|p| ix.end_of(p) >= first);
    if !holds_options || !is_inline(node) || used.range(i..=ix.end[i]).next().is_some() {
        return None;
    }
    // `<label>Paris <input></label>`: the option's own label.
    let in_used = node
        .ancestors()
        .filter_map(ElementRef::wrap)
        .any(|a| used.contains(&ix.pos(a)));
    if in_used {
        return None;
    }
    let mut run: Vec<ego_tree::NodeRef<scraper::Node>> = std::iter::once(node)
        .chain(node.prev_siblings().take_while(|n| is_inline(*n)))
        .collect();
    run.reverse();
    let mut text = String::new();
    for n in run {
        match (n.value().as_text(), ElementRef::wrap(n)) {
            (Some(t), _) => text.push_str(t),
            (None, Some(e)) if !hidden(e) => text.push_str(&text_of(e)),
            _ => {}
        }
    }
    let mut f = found(text, "preceding-text")?;
    f.guessed = true;
    Some(f)
}

pub fn question(
    ix: &Index,
    g: &Group,
    m: Option<&Matrix>,
    prev: Option<usize>,
    used: &BTreeSet<usize>,
) -> Option<Found> {
    let mut described = None;
    let mut around = None;
    for c in containers(ix, g) {
        if let Some(f) = named(ix, c) {
            return Some(f);
        }
        // A dropdown inside a sentence: the sentence asks.
        if g.kind == Kind::Select && around.is_none() && c.value().name() != "select" {
            around = found(text_of(c), "text-around");
        }
        if described.is_none() {
            described = c
                .value()
                .attr("aria-describedby")
                .and_then(|ids| ix.referenced(ids, |t| !is_filler(t)));
        }
    }
    if let Some(f) = m.and_then(|m| found(text_of(m.row_header), "table")) {
        return Some(f);
    }
    if let Some(f) = around.or_else(|| described.and_then(|t| found(t, "aria-describedby"))) {
        return Some(f);
    }
    let first = ix.opts[g.opts[0]].pos;
    before(ix, first, prev.unwrap_or(0), used)
}
