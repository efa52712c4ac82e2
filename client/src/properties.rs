//! Java-style `key=value` properties, so a team can paste the client settings it uses with
//! other Kafka clients: `ProducerConfig::from_properties` and `ConsumerConfig::from_properties`
//! read them, under the Java client's names. An unknown or misspelled key is an error naming
//! it and its line, never ignored.
//!
//! The format is the common part of `java.util.Properties`: one `key=value` (or `key: value`,
//! or `key value`) per line, whitespace around key and value ignored, `#` and `!` start a
//! comment line, a line ending in `\` continues on the next. A key given twice takes its last
//! value, as in Java.

use std::time::Duration;

/// A property that cannot be read or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {key}: {reason}")]
pub struct PropertiesError {
    /// The line it is on (1-based; 0 for a check of the settings together).
    pub line: usize,
    /// The key (empty for a line without one).
    pub key: String,
    /// What is wrong.
    pub reason: String,
}

impl PropertiesError {
    /// The settings read cannot work together: `name`'s check failed (line 0).
    pub fn settings(name: &str, reason: String) -> Self {
        Self {
            line: 0,
            key: name.to_string(),
            reason,
        }
    }
}

/// One `key=value` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Property {
    /// Its line (1-based; the first line of a continued one).
    pub line: usize,
    /// The key.
    pub key: String,
    /// The value, trimmed.
    pub value: String,
}

impl Property {
    /// An error about this property.
    pub fn error(&self, reason: impl Into<String>) -> PropertiesError {
        PropertiesError {
            line: self.line,
            key: self.key.clone(),
            reason: reason.into(),
        }
    }

    /// `true` or `false`.
    ///
    /// # Errors
    /// Anything else.
    pub fn bool(&self) -> Result<bool, PropertiesError> {
        match self.value.to_ascii_lowercase().as_str() {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(self.error(format!("{:?} is not true or false", self.value))),
        }
    }

    /// A whole number of type `T`.
    ///
    /// # Errors
    /// Not a number, or out of `T`'s range.
    pub fn number<T: std::str::FromStr>(&self) -> Result<T, PropertiesError> {
        self.value
            .parse()
            .map_err(|_| self.error(format!("{:?} is not a number in range", self.value)))
    }

    /// Milliseconds (the `.ms` settings).
    ///
    /// # Errors
    /// Not a non-negative number.
    pub fn millis(&self) -> Result<Duration, PropertiesError> {
        Ok(Duration::from_millis(self.number::<u64>()?))
    }

    /// A comma-separated list, each item trimmed, empty items dropped.
    pub fn list(&self) -> Vec<String> {
        self.value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }
}

/// The properties of `text`, in order.
///
/// # Errors
/// A line with a key but no value separator is fine (an empty value, as in Java); a line that
/// is only a separator has no key and is an error.
pub fn parse(text: &str) -> Result<Vec<Property>, PropertiesError> {
    let mut out = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((index, first)) = lines.next() {
        let line = index + 1;
        let mut logical = first.trim_start().to_string();
        if logical.is_empty() || logical.starts_with('#') || logical.starts_with('!') {
            continue;
        }
        // A line ending in an odd number of backslashes continues on the next.
        while (logical.len() - logical.trim_end_matches('\\').len()) % 2 == 1 {
            logical.pop();
            match lines.next() {
                Some((_, next)) => logical.push_str(next.trim_start()),
                None => break,
            }
        }
        let split = logical
            .find(['=', ':'])
            .map(|at| (at, 1))
            .or_else(|| logical.find(char::is_whitespace).map(|at| (at, 0)));
        let (key, value) = match split {
            Some((at, width)) => (&logical[..at], &logical[at + width..]),
            None => (logical.as_str(), ""),
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(PropertiesError {
                line,
                key: String::new(),
                reason: format!("no key in {first:?}"),
            });
        }
        out.push(Property {
            line,
            key: key.to_string(),
            value: value.trim().to_string(),
        });
    }
    // A key given twice: the last one counts.
    let mut seen = std::collections::HashSet::new();
    let mut last: Vec<Property> = out
        .into_iter()
        .rev()
        .filter(|p| seen.insert(p.key.clone()))
        .collect();
    last.reverse();
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn java_properties_lines_are_read() -> Result<(), PropertiesError> {
        let text = "# a comment\n! another\n\nbootstrap.servers = a:9092, b:9092\nacks:all\n\
                    linger.ms 5\nclient.id=one\\\n  two\nclient.id=last\nempty=\n";
        let props = parse(text)?;
        let get = |k: &str| props.iter().find(|p| p.key == k).map(|p| p.value.as_str());
        assert_eq!(get("bootstrap.servers"), Some("a:9092, b:9092"));
        assert_eq!(get("acks"), Some("all"));
        assert_eq!(get("linger.ms"), Some("5"));
        assert_eq!(get("client.id"), Some("last"));
        assert_eq!(get("empty"), Some(""));
        assert_eq!(props.len(), 5);
        let servers = props
            .iter()
            .find(|p| p.key == "bootstrap.servers")
            .map(Property::list);
        assert_eq!(
            servers,
            Some(vec!["a:9092".to_string(), "b:9092".to_string()])
        );
        Ok(())
    }

    #[test]
    fn continued_lines_join_and_bad_values_name_their_line() -> Result<(), PropertiesError> {
        let props = parse("group.id=or\\\n   ders\nlinger.ms=soon\n")?;
        assert_eq!(props[0].value, "orders");
        let error = props[1].millis().expect_err("not a number");
        assert_eq!((error.line, error.key.as_str()), (3, "linger.ms"));
        assert!(parse("=value").is_err());
        Ok(())
    }
}
