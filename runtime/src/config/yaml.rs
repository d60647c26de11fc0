//! A YAML document tree where every node keeps its position, built from yaml-rust2's event parser.
//!
//! We resolve scalars ourselves (YAML 1.1 rules, as Go's yaml.v2 did) instead of letting the parser decide,
//! so `yes` can be a boolean and `3306` can stay the string `"3306"`.

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A 1-based position in the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    /// Line, 1-based.
    pub line: usize,
    /// Column, 1-based.
    pub col: usize,
}

impl From<Marker> for Pos {
    fn from(m: Marker) -> Pos {
        Pos { line: m.line(), col: m.col() + 1 }
    }
}

/// A YAML node with its position.
#[derive(Debug, Clone)]
pub enum Node {
    /// A scalar: its raw text, whether it was plain (unquoted, not a block), and its explicit tag if any.
    Scalar {
        /// The scalar's text.
        value: String,
        /// True for plain (unquoted) scalars: only these resolve to null/bool/int.
        plain: bool,
        /// Explicit tag suffix such as `str` for `!!str`.
        tag: Option<String>,
        /// Where it starts.
        pos: Pos,
    },
    /// A sequence.
    Seq(Vec<Node>, Pos),
    /// A mapping, in source order.
    Map(Vec<(Node, Node)>, Pos),
}

impl Node {
    /// Where the node starts.
    pub fn pos(&self) -> Pos {
        match self {
            Node::Scalar { pos, .. } | Node::Seq(_, pos) | Node::Map(_, pos) => *pos,
        }
    }

    /// True for a null scalar (`~`, `null`, empty) that is plain.
    pub fn is_null(&self) -> bool {
        matches!(self, Node::Scalar { value, plain: true, tag: None, .. }
            if matches!(value.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// A short description of the node's kind for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Node::Scalar { .. } if self.is_null() => "null",
            Node::Scalar { .. } => "a scalar",
            Node::Seq(..) => "a list",
            Node::Map(..) => "a mapping",
        }
    }
}

/// A syntax error with its position.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    /// Where.
    pub pos: Pos,
    /// What.
    pub message: String,
}

enum Frame {
    Seq(Vec<Node>, Pos, usize),
    Map(Vec<(Node, Node)>, Option<Node>, Pos, usize),
}

/// Deepest nesting of sequences and mappings accepted. Real services.yml files nest under ten levels; the limit
/// keeps hostile files from exhausting the stack or memory.
pub const MAX_DEPTH: usize = 128;

/// How much copying for anchors and aliases (nodes, plus scalar bytes / 32) a document may cost beyond its own
/// text. A real file's aliases (shared `env` blocks) cost a few thousand; a "billion laughs" file billions.
pub const MAX_ALIAS_EXPANSION: usize = 100_000;

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    root: Option<Node>,
    /// Anchored nodes and their weights.
    anchors: std::collections::HashMap<usize, (Node, usize)>,
    /// Weight added by alias expansion so far.
    expanded: usize,
    error: Option<SyntaxError>,
}

/// A node's weight for the alias budget: its nodes, plus its scalar bytes / 32.
fn weight(n: &Node) -> usize {
    match n {
        Node::Scalar { value, .. } => 1 + value.len() / 32,
        Node::Seq(items, _) => items.iter().fold(1, |w, i| w.saturating_add(weight(i))),
        Node::Map(entries, _) => {
            entries.iter().fold(1, |w, (k, v)| w.saturating_add(weight(k)).saturating_add(weight(v)))
        }
    }
}

impl Builder {
    fn push_node(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            // Keeping an anchored node for its aliases is a copy: it counts against the budget too.
            let w = weight(&node);
            if self.charge(w, node.pos()) {
                self.anchors.insert(anchor, (node.clone(), w));
            }
        }
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some(Frame::Seq(items, _, _)) => items.push(node),
            Some(Frame::Map(entries, key, _, _)) => match key.take() {
                None => *key = Some(node),
                Some(k) => entries.push((k, node)),
            },
        }
    }

    /// Adds `w` to what copies have cost; false (and an error at `pos`) past the budget.
    fn charge(&mut self, w: usize, pos: Pos) -> bool {
        self.expanded = self.expanded.saturating_add(w);
        if self.expanded > MAX_ALIAS_EXPANSION {
            let message = format!(
                "anchors and aliases expand to more than {MAX_ALIAS_EXPANSION} nodes (an alias bomb?); expand them by hand if this is meant"
            );
            self.fail(pos, message);
            return false;
        }
        true
    }

    fn fail(&mut self, pos: Pos, message: String) {
        if self.error.is_none() {
            self.error = Some(SyntaxError { pos, message });
        }
    }

    fn on_event(&mut self, ev: Event, pos: Pos) {
        match ev {
            Event::Scalar(value, style, anchor, tag) => {
                let node = Node::Scalar { value, plain: style == TScalarStyle::Plain, tag: tag.map(|t| t.suffix), pos };
                self.push_node(node, anchor);
            }
            Event::SequenceStart(..) | Event::MappingStart(..) if self.stack.len() >= MAX_DEPTH => {
                self.fail(pos, format!("nested more than {MAX_DEPTH} levels deep"));
            }
            Event::SequenceStart(anchor, _) => self.stack.push(Frame::Seq(Vec::new(), pos, anchor)),
            Event::MappingStart(anchor, _) => self.stack.push(Frame::Map(Vec::new(), None, pos, anchor)),
            Event::SequenceEnd | Event::MappingEnd => {
                let node = match self.stack.pop() {
                    Some(Frame::Seq(items, p, a)) => (Node::Seq(items, p), a),
                    Some(Frame::Map(entries, _, p, a)) => (Node::Map(entries, p), a),
                    None => return,
                };
                self.push_node(node.0, node.1);
            }
            Event::Alias(id) => match self.anchors.get(&id).map(|(_, w)| *w) {
                Some(w) => {
                    if !self.charge(w, pos) {
                        return;
                    }
                    if let Some((n, _)) = self.anchors.get(&id) {
                        let n = n.clone();
                        self.push_node(n, 0);
                    }
                }
                None => self.fail(pos, "alias to an unknown anchor".into()),
            },
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentStart | Event::DocumentEnd => {}
        }
    }
}

/// The first document of a YAML stream.
#[derive(Debug, Clone)]
pub struct Document {
    /// Its root node; `None` for an empty document.
    pub root: Option<Node>,
    /// Where a second document starts, if there is one (it is not read: AION's yaml.v2 read the first only).
    pub second_document: Option<Pos>,
}

/// Parses the first document of `src`, and notes whether another document follows.
///
/// # Errors
/// The first syntax error, a nesting deeper than [`MAX_DEPTH`], or alias expansion beyond
/// [`MAX_ALIAS_EXPANSION`], with its position.
pub fn parse_document(src: &str) -> Result<Document, SyntaxError> {
    let mut b = Builder::default();
    let mut parser = Parser::new_from_str(src);
    let err = |e: yaml_rust2::ScanError| SyntaxError { pos: Pos::from(*e.marker()), message: e.info().to_owned() };
    let mut second_document = None;
    // Events are pulled one by one (no recursion per nesting level, unlike `Parser::load`), and the build stops
    // at the first error.
    loop {
        let (ev, mark) = parser.next_token().map_err(err)?;
        match ev {
            Event::StreamEnd => break,
            Event::DocumentEnd => {
                second_document = match parser.next_token() {
                    Ok((Event::DocumentStart, m)) => Some(Pos::from(m)),
                    Ok(_) => None,
                    // Whatever follows is not read; a broken second document is still a second document.
                    Err(e) => Some(Pos::from(*e.marker())),
                };
                break;
            }
            ev => b.on_event(ev, Pos::from(mark)),
        }
        if let Some(e) = b.error.take() {
            return Err(e);
        }
    }
    Ok(Document { root: b.root, second_document })
}

/// Parses the first document of `src`. An empty document gives `None`.
///
/// # Errors
/// As [`parse_document`].
pub fn parse(src: &str) -> Result<Option<Node>, SyntaxError> {
    parse_document(src).map(|d| d.root)
}
