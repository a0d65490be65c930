//! Finds the line a config key stands on, so semantic errors can name it like parse errors do.
//!
//! serde reports a line for syntax and type errors, but checks that run after parsing (a duplicate
//! upstream name, a target that is not a URL) only know the key's path. This walks the text
//! with the indentation rules of block YAML, plus flow mappings on one line, which covers how
//! sluice configs are written. When it cannot tell, the error still names the key.

/// One step of a key path: `upstreams[1].target` is `Key(upstreams) Index(1) Key(target)`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

fn segments(path: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = match part.find('[') {
            Some(at) => (&part[..at], &part[at..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(Segment::Key(key));
        }
        while let Some(close) = rest.find(']') {
            if let Ok(index) = rest[1..close].parse() {
                out.push(Segment::Index(index));
            }
            rest = &rest[close + 1..];
        }
    }
    out
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

fn is_content(line: &str) -> bool {
    let trimmed = line.trim_start();
    !trimmed.is_empty() && !trimmed.starts_with('#')
}

/// Does `line` hold `key:` as a block key (after an optional `- `) or inside a flow mapping?
fn holds_key(line: &str, key: &str) -> Option<bool> {
    let body = line.trim_start().trim_start_matches("- ").trim_start();
    let pattern = format!("{key}:");
    if body.starts_with(&pattern) {
        return Some(true);
    }
    let flow = [format!("{{{key}:"), format!("{{ {key}:"), format!(", {key}:"), format!(",{key}:")];
    flow.iter().any(|p| line.contains(p.as_str())).then_some(false)
}

/// 1-based line of the key at `path` in `text`, if it can be found.
pub fn line_of(text: &str, path: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let (mut start, mut end) = (0usize, lines.len());
    let mut found = None;
    for segment in segments(path) {
        match segment {
            Segment::Key(key) => {
                // A key that is not written (a required one left out) is reported at its parent.
                // A key inside a flow mapping counts only on its parent's own line, and a
                // top-level key only at the top level: `admin` is not `listen: { admin: .. }`.
                let top = found.is_none();
                let Some(at) = (start..end).find(|&n| {
                    is_content(lines[n])
                        && match holds_key(lines[n], key) {
                            Some(true) => !top || indent(lines[n]) == 0,
                            Some(false) => !top && n == start,
                            None => false,
                        }
                }) else {
                    break;
                };
                found = Some(at);
                if holds_key(lines[at], key) == Some(false) {
                    // Inside a flow mapping: everything below is on this line.
                    (start, end) = (at, at + 1);
                    continue;
                }
                let key_indent = indent(lines[at]) + if lines[at].trim_start().starts_with("- ") { 2 } else { 0 };
                let block_end = (at + 1..end)
                    .find(|&n| {
                        is_content(lines[n])
                            && indent(lines[n]) <= key_indent
                            && !lines[n].trim_start().starts_with("- ")
                            || is_content(lines[n]) && indent(lines[n]) < key_indent
                    })
                    .unwrap_or(end);
                (start, end) = (at, block_end);
            }
            Segment::Index(index) => {
                let dashes: Vec<usize> = (start..end).filter(|&n| lines[n].trim_start().starts_with("- ")).collect();
                // No block items: a flow sequence (`hosts: [a, b]`), whose items are on the key's line.
                let Some(item_indent) = dashes.iter().map(|&n| indent(lines[n])).min() else { break };
                let items: Vec<usize> = dashes.into_iter().filter(|&n| indent(lines[n]) == item_indent).collect();
                let Some(&at) = items.get(index) else { break };
                found = Some(at);
                let next = items.get(index + 1).copied().unwrap_or(end);
                (start, end) = (at, next);
            }
        }
    }
    found.map(|n| n + 1)
}

#[cfg(test)]
mod tests {
    use super::line_of;

    const TEXT: &str = "\
listen: { proxy: 127.0.0.1:3128, admin: 127.0.0.1:9901 }
# a comment
upstreams:
  - name: hubspot
    hosts: [api.hubapi.com]
    timeouts: { connect: 2s, request: 30s }
  - name: salesforce
    target: https://x
    timeouts:
      connect: 2s
      request: 3s
";

    #[test]
    fn finds_block_and_flow_keys() {
        assert_eq!(line_of(TEXT, "listen"), Some(1));
        assert_eq!(line_of(TEXT, "listen.admin"), Some(1));
        assert_eq!(line_of(TEXT, "upstreams"), Some(3));
        assert_eq!(line_of(TEXT, "upstreams[0]"), Some(4));
        assert_eq!(line_of(TEXT, "upstreams[0].name"), Some(4));
        assert_eq!(line_of(TEXT, "upstreams[0].timeouts.request"), Some(6));
        assert_eq!(line_of(TEXT, "upstreams[1].target"), Some(8));
        assert_eq!(line_of(TEXT, "upstreams[1].timeouts.request"), Some(11));
        assert_eq!(line_of(TEXT, "upstreams[2]"), Some(3), "an absent item: its list's line");
        assert_eq!(line_of(TEXT, "upstreams[0].hosts[1]"), Some(5), "an item of a flow list");
        assert_eq!(line_of(TEXT, "upstreams[1].hosts"), Some(7), "an absent key: its parent's line");
        assert_eq!(line_of(TEXT, "nope"), None);
        assert_eq!(line_of(TEXT, "admin"), None, "a nested key is not a top-level one");
        let text = "listen: { proxy: 127.0.0.1:0, admin: 127.0.0.1:0 }\nadmin:\n  max_connections: 0\n";
        assert_eq!(line_of(text, "admin.max_connections"), Some(3));
    }
}
