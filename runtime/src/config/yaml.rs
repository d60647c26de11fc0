//! A YAML document tree where every node keeps its position, built from yaml-rust2's event parser.
//!
//! We resolve scalars ourselves (YAML 1.1 rules, as Go's yaml.v2 did) instead of letting the parser decide,
//! so `yes` can be a boolean and `3306` can stay the string `"3306"`.

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
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

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    root: Option<Node>,
    anchors: std::collections::HashMap<usize, Node>,
    docs: usize,
    error: Option<SyntaxError>,
}

impl Builder {
    fn push_node(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
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
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = Pos::from(mark);
        match ev {
            Event::DocumentStart => self.docs += 1,
            Event::Scalar(value, style, anchor, tag) => {
                let node = Node::Scalar { value, plain: style == TScalarStyle::Plain, tag: tag.map(|t| t.suffix), pos };
                self.push_node(node, anchor);
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
            Event::Alias(id) => match self.anchors.get(&id).cloned() {
                Some(n) => self.push_node(n, 0),
                None => {
                    if self.error.is_none() {
                        self.error = Some(SyntaxError { pos, message: "alias to an unknown anchor".into() });
                    }
                }
            },
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
    }
}

/// Parses the first document of `src`. An empty document gives `None`.
///
/// # Errors
/// The first syntax error, with its position.
pub fn parse(src: &str) -> Result<Option<Node>, SyntaxError> {
    let mut b = Builder::default();
    let mut parser = Parser::new_from_str(src);
    parser
        .load(&mut b, false)
        .map_err(|e| SyntaxError { pos: Pos::from(*e.marker()), message: e.info().to_owned() })?;
    if let Some(e) = b.error {
        return Err(e);
    }
    Ok(b.root)
}
