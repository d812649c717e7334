//! Plain-text tables for the CLI's lists: a header row, columns as wide as
//! their widest cell, numbers aligned right. Cells are made terminal-safe
//! ([`crate::term::line`]) and counted in characters, so a provider's label
//! can neither break the layout nor drive the terminal.

use std::fmt::Write;

/// How a column's cells line up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A table being filled.
#[derive(Clone, Debug)]
pub struct Table {
    headers: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[(&'static str, Align)]) -> Self {
        Self {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (missing cells are blank, extra ones dropped).
    pub fn row(&mut self, cells: Vec<String>) {
        let mut cells: Vec<String> = cells
            .into_iter()
            .take(self.headers.len())
            .map(|c| crate::term::line(&c).into_owned())
            .collect();
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table, or `empty` (a sentence saying there is nothing) when it
    /// has no rows.
    pub fn render_or(&self, empty: &str) -> String {
        if self.rows.is_empty() {
            return empty.to_string();
        }
        let width = |i: usize| {
            self.rows
                .iter()
                .map(|r| r[i].chars().count())
                .chain([self.headers[i].0.len()])
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..self.headers.len()).map(width).collect();
        let mut out = String::new();
        let line = |out: &mut String, cells: &mut dyn Iterator<Item = (&str, Align)>| {
            let mut l = String::new();
            for (i, (cell, align)) in cells.enumerate() {
                if i > 0 {
                    l.push_str("  ");
                }
                let pad = widths[i].saturating_sub(cell.chars().count());
                match align {
                    Align::Left => {
                        l.push_str(cell);
                        l.push_str(&" ".repeat(pad));
                    }
                    Align::Right => {
                        l.push_str(&" ".repeat(pad));
                        l.push_str(cell);
                    }
                }
            }
            let _ = writeln!(out, "{}", l.trim_end());
        };
        line(&mut out, &mut self.headers.iter().map(|(h, a)| (*h, *a)));
        for r in &self.rows {
            line(
                &mut out,
                &mut r
                    .iter()
                    .zip(&self.headers)
                    .map(|(c, (_, a))| (c.as_str(), *a)),
            );
        }
        out.pop(); // the last newline: `term::out` adds one
        out
    }
}

/// An age for a table: `42s`, `5m`, `3h`, `2d`.
pub fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_fit_their_widest_cell_and_numbers_align_right() {
        let mut t = Table::new(&[("ID", Align::Left), ("COST", Align::Right)]);
        assert_eq!(t.render_or("no jobs"), "no jobs");
        t.row(vec!["a".into(), "1.5 cr".into()]);
        t.row(vec!["bbbb\u{1b}[2J".into(), "10.25 cr".into()]);
        let s = t.render_or("no jobs");
        let lines: Vec<&str> = s.lines().collect();
        // The escape is shown as text (11 characters), and counted so.
        assert_eq!(lines[0], format!("{:<11}  {:>8}", "ID", "COST"));
        assert_eq!(lines[1], format!("{:<11}  {:>8}", "a", "1.5 cr"));
        assert_eq!(lines[2], "bbbb\\x1b[2J  10.25 cr");
        assert!(!s.contains('\u{1b}'));
    }

    #[test]
    fn ages_read_at_a_glance() {
        for (ms, want) in [
            (0, "0s"),
            (59_999, "59s"),
            (60_000, "1m"),
            (7_200_000, "2h"),
            (172_800_000, "2d"),
        ] {
            assert_eq!(age(ms), want);
        }
    }
}
