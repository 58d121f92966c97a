//! What an option is and what it says: options grouped into questions
//! (radios by name, other controls by the group element around them,
//! dropdowns by their `select`), and each option's text from its label,
//! ARIA name, image alt text, table column header or, as a guess that is
//! reported, the text next to it or its value.

use std::collections::{BTreeSet, HashMap};

use ego_tree::NodeId;
use scraper::ElementRef;

use super::index::{Index, Kind, Opt};
use super::text::{is_filler, strip_marker, text_of};

pub struct Group {
    pub kind: Kind,
    /// Indexes into `Index::opts`, in document order.
    pub opts: Vec<usize>,
}

#[derive(Hash, PartialEq, Eq)]
enum Key {
    Name(Kind, String),
    Node(NodeId),
}

fn role_is(e: ElementRef, roles: &[&str]) -> bool {
    e.value()
        .attr("role")
        .is_some_and(|r| r.split_whitespace().any(|r| roles.contains(&r)))
}

/// Elements that hold one question's options by their semantics.
pub fn is_group_element(e: ElementRef) -> bool {
    matches!(e.value().name(), "fieldset" | "select")
        || role_is(e, &["radiogroup", "group", "listbox", "menu"])
}

fn nearest(o: &Opt, pick: impl Fn(ElementRef) -> bool) -> Option<NodeId> {
    o.el.ancestors()
        .filter_map(ElementRef::wrap)
        .find(|a| pick(*a))
        .map(|a| a.id())
}

fn parent(o: &Opt) -> Key {
    Key::Node(o.el.parent().map_or(o.el.id(), |p| p.id()))
}

fn key(o: &Opt) -> Key {
    let name = o.el.value().attr("name").map(str::trim).unwrap_or_default();
    match o.kind {
        // Radios with one name are one control by the HTML rules.
        Kind::Radio if !name.is_empty() => Key::Name(Kind::Radio, name.to_owned()),
        Kind::Radio => nearest(o, is_group_element).map_or_else(|| parent(o), Key::Node),
        // Checkboxes often carry one name per option (`q1_choice0`):
        // the group element wins; names are joined up in `groups`.
        Kind::Checkbox => nearest(o, is_group_element).map_or_else(
            || {
                if name.is_empty() {
                    parent(o)
                } else {
                    Key::Name(Kind::Checkbox, name.to_owned())
                }
            },
            Key::Node,
        ),
        Kind::Select => {
            nearest(o, |a| a.value().name() == "select").map_or_else(|| parent(o), Key::Node)
        }
        Kind::ListOption => {
            nearest(o, |a| role_is(a, &["listbox"])).map_or_else(|| parent(o), Key::Node)
        }
        // Form builders put ARIA checkboxes in a `role=list`.
        Kind::AriaRadio | Kind::AriaCheckbox => {
            nearest(o, |a| is_group_element(a) || role_is(a, &["list"]))
                .map_or_else(|| parent(o), Key::Node)
        }
    }
}

/// The options grouped into would-be questions, ordered by first option.
pub fn groups(ix: &Index) -> Vec<Group> {
    let mut at: HashMap<Key, usize> = HashMap::new();
    let mut out: Vec<Group> = Vec::new();
    for (i, o) in ix.opts.iter().enumerate() {
        let g = *at.entry(key(o)).or_insert_with(|| {
            out.push(Group {
                kind: o.kind,
                opts: vec![],
            });
            out.len() - 1
        });
        out[g].opts.push(i);
    }
    join_numbered(ix, out)
}

/// A checkbox name without its option number: `q1_choice0` → `q1_choice`.
fn stem(ix: &Index, g: &Group) -> Option<String> {
    let name = ix.opts[g.opts[0]].el.value().attr("name")?;
    let s = name
        .trim_end_matches("[]")
        .trim_end_matches(|c: char| c.is_ascii_digit());
    (g.kind == Kind::Checkbox && g.opts.len() == 1 && !s.is_empty()).then(|| s.to_owned())
}

/// Lone checkboxes next to each other whose names differ only in a
/// trailing number are one question's options.
fn join_numbered(ix: &Index, groups: Vec<Group>) -> Vec<Group> {
    let mut out: Vec<(Group, Option<String>)> = Vec::with_capacity(groups.len());
    for g in groups {
        let s = stem(ix, &g);
        if let Some((last, last_stem)) = out.last_mut() {
            let adjacent = last.opts.last().is_some_and(|l| l + 1 == g.opts[0]);
            if s.is_some() && *last_stem == s && adjacent {
                last.opts.extend(g.opts);
                continue;
            }
        }
        out.push((g, s));
    }
    out.into_iter().map(|(g, _)| g).collect()
}

/// Column headers of a question-per-row table (a Likert matrix).
pub struct Matrix<'a> {
    pub row_header: ElementRef<'a>,
    /// Column header text by each option's cell.
    pub columns: HashMap<NodeId, String>,
}

fn cells(tr: ElementRef) -> impl Iterator<Item = ElementRef> {
    tr.children()
        .filter_map(ElementRef::wrap)
        .filter(|c| matches!(c.value().name(), "td" | "th"))
}

/// A group whose options all sit in one table row, after a first cell
/// without options: that cell asks, and the header row names the columns.
pub fn matrix<'a>(
    ix: &Index<'a>,
    g: &Group,
    headers: &mut HashMap<NodeId, Vec<String>>,
) -> Option<Matrix<'a>> {
    let first = ix.opts[g.opts[0]].el;
    let last = ix.opts[*g.opts.last()?].pos;
    let tr = first
        .ancestors()
        .filter_map(ElementRef::wrap)
        .find(|a| a.value().name() == "tr")?;
    if ix.end_of(tr) < last {
        return None;
    }
    let row_header = cells(tr).next()?;
    if ix.options_in(row_header) > 0 || text_of(row_header).is_empty() {
        return None;
    }
    let table = tr
        .ancestors()
        .filter_map(ElementRef::wrap)
        .find(|a| a.value().name() == "table")?;
    let head = headers.entry(table.id()).or_insert_with(|| {
        table
            .descendants()
            .filter_map(ElementRef::wrap)
            .find(|e| e.value().name() == "tr")
            .filter(|h| ix.options_in(*h) == 0)
            .map(|h| cells(h).map(text_of).collect())
            .unwrap_or_default()
    });
    let columns = cells(tr)
        .enumerate()
        .filter_map(|(i, c)| Some((c.id(), head.get(i)?.clone())))
        .collect();
    Some(Matrix {
        row_header,
        columns,
    })
}

/// The text an option shows, the label elements it used (so they are not
/// taken for question text), and a warning when it had to be guessed.
pub struct OptionText {
    pub text: String,
    pub guess: Option<&'static str>,
}

fn labelled_by(ix: &Index, el: ElementRef, used: &mut BTreeSet<usize>) -> Option<String> {
    let v = el.value();
    let ids = v.attr("aria-labelledby").unwrap_or_default();
    for id in ids.split_whitespace() {
        if let Some(e) = ix.by_id.get(id) {
            used.insert(ix.pos(*e));
        }
    }
    ix.referenced(ids, |_| true)
        .or_else(|| v.attr("aria-label").map(super::text::clean))
        .filter(|t| !t.is_empty())
}

/// Text after a bare input up to the next control or line break:
/// `<input type=radio> Paris<br>`.
fn next_to(el: ElementRef) -> String {
    let mut s = String::new();
    for sib in el.next_siblings() {
        match ElementRef::wrap(sib) {
            Some(e)
                if matches!(
                    e.value().name(),
                    "input" | "br" | "select" | "label" | "div" | "p"
                ) =>
            {
                break
            }
            Some(e) => s.push_str(&text_of(e)),
            None => {
                if let Some(t) = sib.value().as_text() {
                    s.push_str(t);
                }
            }
        }
        s.push(' ');
    }
    super::text::clean(&s)
}

pub fn option_text(
    ix: &Index,
    o: &Opt,
    m: Option<&Matrix>,
    used: &mut BTreeSet<usize>,
) -> OptionText {
    let found = |text: String| OptionText {
        text: strip_marker(&text),
        guess: None,
    };
    let v = o.el.value();
    if o.kind != Kind::Radio && o.kind != Kind::Checkbox {
        let own = match v.attr("label") {
            Some(l) if o.kind == Kind::Select => l.to_owned(),
            _ => text_of(o.el),
        };
        let named = labelled_by(ix, o.el, used).unwrap_or(own);
        // An ARIA radio drawn as an empty circle is named by the label
        // around it, like a native input.
        if !named.is_empty() || o.kind == Kind::Select {
            return found(named);
        }
    }
    let mut labels: Vec<ElementRef> = v
        .attr("id")
        .and_then(|id| ix.labels_for.get(id))
        .cloned()
        .unwrap_or_default();
    if let Some(wrap) =
        o.el.ancestors()
            .filter_map(ElementRef::wrap)
            .find(|a| a.value().name() == "label")
    {
        labels.push(wrap);
    }
    let from_labels: Vec<String> = labels
        .iter()
        .map(|l| {
            used.insert(ix.pos(*l));
            text_of(*l)
        })
        .filter(|t| !t.is_empty())
        .collect();
    if !from_labels.is_empty() {
        return found(from_labels.join(" "));
    }
    // In a matrix the column names the option; its ARIA name repeats the row.
    let column =
        o.el.ancestors()
            .find_map(|a| m.and_then(|m| m.columns.get(&a.id())));
    if let Some(c) = column.filter(|c| !c.is_empty()) {
        return found(c.clone());
    }
    if let Some(t) = labelled_by(ix, o.el, used).or_else(|| v.attr("title").map(str::to_owned)) {
        return found(t);
    }
    let beside = next_to(o.el);
    let around = || {
        o.el.ancestors()
            .filter_map(ElementRef::wrap)
            .take_while(|a| ix.options_in(*a) == 1)
            .map(text_of)
            .find(|t| !t.is_empty())
    };
    match (!beside.is_empty()).then_some(beside).or_else(around) {
        Some(t) => OptionText {
            text: strip_marker(&t),
            guess: Some("has no label; used the text next to it"),
        },
        None => OptionText {
            text: super::text::clean(v.attr("value").unwrap_or_default()),
            guess: Some("has no label; used its value"),
        },
    }
}

/// A dropdown's "-- Select --" entry without an empty value.
pub fn is_placeholder(kind: Kind, text: &str) -> bool {
    matches!(kind, Kind::Select | Kind::ListOption)
        && (text.starts_with('-')
            || text.ends_with("...")
            || text.ends_with('…')
            || (is_filler(text) && text.len() > 3)
            || ["select", "choose", "please"]
                .iter()
                .any(|p| text.to_lowercase().starts_with(p)))
}
