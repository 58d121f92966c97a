//! One pass over the document that everything else looks things up in:
//! document order and subtree extent of every node, elements by id, labels
//! by `for`, and every element that can be an answer option. Built once, so
//! that grouping and question finding never rescan the page per group
//! (extraction stays linear in the number of elements).

use std::collections::HashMap;

use ego_tree::{NodeId, NodeRef};
use scraper::{ElementRef, Html, Node};

use super::{ExtractError, MAX_INPUTS};

/// What kind of control an option is; named in a question's `method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Radio,
    Checkbox,
    AriaRadio,
    AriaCheckbox,
    ListOption,
    Select,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Radio => "radio",
            Kind::Checkbox => "checkbox",
            Kind::AriaRadio => "aria-radio",
            Kind::AriaCheckbox => "aria-checkbox",
            Kind::ListOption => "listbox",
            Kind::Select => "select",
        }
    }
}

pub struct Opt<'a> {
    pub el: ElementRef<'a>,
    pub pos: usize,
    pub kind: Kind,
}

pub struct Index<'a> {
    pub nodes: Vec<NodeRef<'a, Node>>,
    order: HashMap<NodeId, usize>,
    /// The document position of each node's last descendant.
    pub end: Vec<usize>,
    pub by_id: HashMap<&'a str, ElementRef<'a>>,
    pub labels_for: HashMap<&'a str, Vec<ElementRef<'a>>>,
    /// Option elements in document order.
    pub opts: Vec<Opt<'a>>,
}

fn role(e: &scraper::node::Element) -> &str {
    e.attr("role")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_default()
}

/// A `<select>` entry a person cannot meaningfully pick: "-- choose --".
fn placeholder(e: ElementRef) -> bool {
    e.value().attr("value").is_some_and(|v| v.trim().is_empty())
        || (e.value().attr("disabled").is_some() && e.value().attr("selected").is_some())
}

fn kind_of(e: ElementRef) -> Option<Kind> {
    let v = e.value();
    match v.name() {
        "input" => {
            let t = v.attr("type").unwrap_or_default();
            if t.eq_ignore_ascii_case("radio") {
                Some(Kind::Radio)
            } else if t.eq_ignore_ascii_case("checkbox") {
                Some(Kind::Checkbox)
            } else {
                None
            }
        }
        "option" => {
            let in_select = e
                .ancestors()
                .take(2)
                .filter_map(ElementRef::wrap)
                .any(|a| a.value().name() == "select");
            (in_select && !placeholder(e)).then_some(Kind::Select)
        }
        _ => match role(v) {
            "radio" | "menuitemradio" => Some(Kind::AriaRadio),
            "checkbox" | "menuitemcheckbox" | "switch" => Some(Kind::AriaCheckbox),
            "option" => Some(Kind::ListOption),
            _ => None,
        },
    }
}

impl<'a> Index<'a> {
    pub fn build(doc: &'a Html) -> Result<Self, ExtractError> {
        let nodes: Vec<NodeRef<'a, Node>> = doc.tree.root().descendants().collect();
        let mut by_id = HashMap::new();
        let mut labels_for: HashMap<&str, Vec<ElementRef>> = HashMap::new();
        let mut opts = Vec::new();
        for (pos, n) in nodes.iter().enumerate() {
            let Some(el) = ElementRef::wrap(*n) else {
                continue;
            };
            if let Some(id) = el.value().attr("id") {
                by_id.entry(id).or_insert(el);
            }
            if el.value().name() == "label" {
                if let Some(f) = el.value().attr("for") {
                    labels_for.entry(f).or_default().push(el);
                }
            }
            // Moodle's hidden "clear my choice" radio is not an answer.
            if let Some(kind) = kind_of(el).filter(|_| !super::text::aria_hidden(el)) {
                opts.push(Opt { el, pos, kind });
                // Refused before any per-group work: no page within the
                // question and option caps needs more.
                if opts.len() > MAX_INPUTS {
                    return Err(ExtractError::TooManyInputs { max: MAX_INPUTS });
                }
            }
        }
        let order: HashMap<NodeId, usize> =
            nodes.iter().enumerate().map(|(i, n)| (n.id(), i)).collect();
        let mut end: Vec<usize> = (0..nodes.len()).collect();
        // Children come after their parents, so a reverse walk sees every
        // subtree complete before its root.
        for i in (0..nodes.len()).rev() {
            if let Some(p) = nodes[i].parent().and_then(|p| order.get(&p.id())) {
                end[*p] = end[*p].max(end[i]);
            }
        }
        let mut index = Self {
            nodes,
            order,
            end,
            by_id,
            labels_for,
            opts,
        };
        index.drop_wrappers();
        Ok(index)
    }

    /// An ARIA radio that wraps a native input is one option, not two: the
    /// native one is kept.
    fn drop_wrappers(&mut self) {
        let end = &self.end;
        let mut keep = vec![true; self.opts.len()];
        for (i, o) in self.opts.iter().enumerate() {
            let aria = matches!(
                o.kind,
                Kind::AriaRadio | Kind::AriaCheckbox | Kind::ListOption
            );
            if aria && self.opts.get(i + 1).is_some_and(|n| n.pos <= end[o.pos]) {
                keep[i] = false;
            }
        }
        let mut k = keep.into_iter();
        self.opts.retain(|_| k.next().unwrap_or(true));
    }

    pub fn pos(&self, e: ElementRef) -> usize {
        self.order.get(&e.id()).copied().unwrap_or_default()
    }

    pub fn end_of(&self, e: ElementRef) -> usize {
        self.end[self.pos(e)]
    }

    /// How many options lie inside the element.
    pub fn options_in(&self, e: ElementRef) -> usize {
        let (start, end) = (self.pos(e), self.end_of(e));
        let lo = self.opts.partition_point(|o| o.pos < start);
        let hi = self.opts.partition_point(|o| o.pos <= end);
        hi - lo
    }

    /// The joined text of the elements an `aria-labelledby` (or
    /// `-describedby`) list names, leaving out parts that are filler.
    pub fn referenced(&self, ids: &str, keep: impl Fn(&str) -> bool) -> Option<String> {
        let parts: Vec<String> = ids
            .split_whitespace()
            .filter_map(|id| self.by_id.get(id))
            .map(|e| super::text::text_of(*e))
            .filter(|t| !t.is_empty() && keep(t))
            .collect();
        (!parts.is_empty()).then(|| parts.join(" "))
    }
}
