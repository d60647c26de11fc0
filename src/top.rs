//! `aion top`: the live view in the terminal (ratatui), for a device reached over SSH — the web view's content:
//! instances with state, rates and queues, dead letters, devices and cluster nodes, refreshed every second from
//! the runtime's control socket (or `--remote`). `q` or Esc quits; ↑/↓ and PgUp/PgDn scroll.

use aion::actors::control::StatusReport;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table};
use ratatui::Frame;
use std::collections::HashMap;
use std::time::Instant;

/// What `top` remembers between two frames: the inputs counted last time, to show rates.
#[derive(Default)]
pub struct View {
    last: HashMap<(String, u32), (u64, Instant)>,
    rates: HashMap<(String, u32), f64>,
    /// First row shown.
    pub scroll: usize,
}

impl View {
    /// Takes a new status in (rates from the difference with the last one).
    pub fn update(&mut self, r: &StatusReport) {
        let now = Instant::now();
        for i in &r.instances {
            let key = (i.service.clone(), i.instance);
            if let Some((before, at)) = self.last.get(&key) {
                let dt = now.duration_since(*at).as_secs_f64();
                if dt > 0.0 {
                    self.rates.insert(key.clone(), i.kanbans_in.saturating_sub(*before) as f64 / dt);
                }
            }
            self.last.insert(key, (i.kanbans_in, now));
        }
    }
}

fn state_color(s: &str) -> Color {
    match s {
        "running" => Color::Green,
        "backoff" | "stopping" => Color::Yellow,
        "crash-loop" | "failed" | "not-runnable" => Color::Red,
        _ => Color::DarkGray,
    }
}

/// Draws one frame.
pub fn draw(f: &mut Frame<'_>, r: &StatusReport, v: &View) {
    let side = !r.dead_letters.is_empty() || r.federation.is_some() || r.cluster.is_some();
    let [head, body] = Layout::vertical([Constraint::Length(2), Constraint::Min(3)]).areas(f.area());
    let (ins, total_in, total_out) = (
        r.instances.len(),
        r.instances.iter().map(|i| i.kanbans_in).sum::<u64>(),
        r.instances.iter().map(|i| i.kanbans_out).sum::<u64>(),
    );
    let dead: u64 = r.dead_letters.values().sum();
    let title = Line::from(vec![
        Span::styled("aion top", Style::default().add_modifier(Modifier::BOLD)),
        Span::raw(format!(
            "  device {}  up {}s  {ins} instances  in {total_in}  out {total_out}  dead letters {dead}",
            if r.device_name.is_empty() { "-" } else { &r.device_name },
            r.uptime_secs
        )),
    ]);
    f.render_widget(
        Paragraph::new(vec![
            title,
            Line::from(Span::styled("q quits, ↑/↓ scroll", Style::default().fg(Color::DarkGray))),
        ]),
        head,
    );
    let [main, aside] = if side {
        Layout::horizontal([Constraint::Min(60), Constraint::Length(40)]).areas(body)
    } else {
        Layout::horizontal([Constraint::Min(60), Constraint::Length(0)]).areas(body)
    };
    let header = Row::new([
        "SERVICE",
        "N",
        "STATE",
        "SESSION",
        "IN",
        "OUT",
        "IN/S",
        "QUEUE",
        "INFLIGHT",
        "RESTARTS",
        "POD / LAST EXIT",
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    let rows: Vec<Row<'_>> = r
        .instances
        .iter()
        .skip(v.scroll)
        .map(|i| {
            let state = i.state.as_str();
            let rate = v.rates.get(&(i.service.clone(), i.instance)).copied().unwrap_or(0.0);
            let extra = match (&i.pod, &i.last_exit) {
                (Some(p), _) => format!("{} {}", p.pod, p.state),
                (None, Some(e)) => e.clone(),
                _ => String::new(),
            };
            Row::new(vec![
                Cell::from(i.service.clone()),
                Cell::from(i.instance.to_string()),
                Cell::from(state).style(Style::default().fg(state_color(state))),
                Cell::from(i.session.map_or("-", |k| k.as_str())),
                Cell::from(i.kanbans_in.to_string()),
                Cell::from(i.kanbans_out.to_string()),
                Cell::from(format!("{rate:.1}")),
                Cell::from(i.queue_depth.to_string()),
                Cell::from(i.inflight.to_string()),
                Cell::from(i.restarts.to_string()),
                Cell::from(extra),
            ])
        })
        .collect();
    let widths = [
        Constraint::Min(12),
        Constraint::Length(4),
        Constraint::Length(12),
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Min(10),
    ];
    let table =
        Table::new(rows, widths).header(header).block(Block::default().borders(Borders::ALL).title(" instances "));
    f.render_widget(table, main);
    if side {
        draw_side(f, r, aside);
    }
}

fn draw_side(f: &mut Frame<'_>, r: &StatusReport, area: Rect) {
    let mut lines: Vec<Line<'_>> = Vec::new();
    lines.push(Line::from(Span::styled("dead letters", Style::default().add_modifier(Modifier::BOLD))));
    if r.dead_letters.is_empty() {
        lines.push(Line::from("  none"));
    }
    for (k, n) in &r.dead_letters {
        lines.push(Line::from(format!("  {k}: {n}")));
    }
    if let Some(fed) = &r.federation {
        lines.push(Line::from(""));
        lines.push(Line::from(Span::styled("devices", Style::default().add_modifier(Modifier::BOLD))));
        for d in &fed.devices {
            let color = if d.state == "up" { Color::Green } else { Color::Red };
            lines.push(Line::from(vec![
                Span::raw(format!("  {} ", d.name)),
                Span::styled(d.state.clone(), Style::default().fg(color)),
                Span::raw(format!(" outbox {}", d.outbox)),
            ]));
        }
    }
    if let Some(c) = &r.cluster {
        lines.push(Line::from(""));
        lines.push(Line::from(Span::styled("cluster nodes", Style::default().add_modifier(Modifier::BOLD))));
        for n in &c.nodes {
            let (t, color) = if n.connected { ("connected", Color::Green) } else { ("lost", Color::Red) };
            lines.push(Line::from(vec![
                Span::raw(format!("  {} ({}) ", n.name, n.role)),
                Span::styled(t, Style::default().fg(color)),
                Span::raw(format!(" {} instances", n.instances.len())),
            ]));
        }
    }
    f.render_widget(Paragraph::new(lines).block(Block::default().borders(Borders::ALL)), area);
}

/// One frame rendered to text (`aion top --once`: scripts, tests, a screenshot in a README).
pub fn render_text(r: &StatusReport, width: u16, height: u16) -> Result<String, String> {
    let backend = ratatui::backend::TestBackend::new(width, height);
    let mut term = ratatui::Terminal::new(backend).map_err(|e| e.to_string())?;
    let mut v = View::default();
    v.update(r);
    term.draw(|f| draw(f, r, &v)).map_err(|e| e.to_string())?;
    let buf = term.backend().buffer();
    let mut out = String::new();
    for y in 0..buf.area.height {
        let line: String = (0..buf.area.width).map(|x| buf[(x, y)].symbol().to_owned()).collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    Ok(out)
}
