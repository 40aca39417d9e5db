//! How kbsctl prints what the KBS answered: a human table or line, or JSON.

use clap::ValueEnum;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde_json::Value;

/// Output format for listings (`--output`).
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

impl Output {
    /// True for `--output json`.
    pub fn is_json(self) -> bool {
        self == Output::Json
    }
}

/// Prints `v` as compact JSON, or the `human` line made from it.
pub fn print_value(output: Output, v: &Value, human: impl Fn(&Value) -> String) {
    match output {
        Output::Json => println!("{v}"),
        Output::Table => println!("{}", human(v)),
    }
}

/// Prints `v` as indented JSON.
pub fn print_pretty(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// An empty table with these column headers.
pub fn table(headers: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(headers.to_vec());
    t
}

/// A JSON value as a table cell: strings without quotes, null as nothing.
pub fn cell(v: &Value) -> String {
    v.as_str().map(str::to_string).unwrap_or_else(|| {
        if v.is_null() {
            String::new()
        } else {
            v.to_string()
        }
    })
}

/// Unix milliseconds as an HTTP date (a missing value is the epoch).
pub fn http_date(v: &Value) -> String {
    let ms = v.as_u64().unwrap_or(0);
    httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cells_show_strings_bare_and_null_as_nothing() {
        assert_eq!(cell(&json!("web-1")), "web-1");
        assert_eq!(cell(&json!(null)), "");
        assert_eq!(cell(&json!(true)), "true");
        assert_eq!(cell(&json!(42)), "42");
    }

    #[test]
    fn dates_are_http_dates_and_missing_is_the_epoch() {
        assert_eq!(http_date(&json!(1_000)), "Thu, 01 Jan 1970 00:00:01 GMT");
        assert_eq!(http_date(&json!(null)), "Thu, 01 Jan 1970 00:00:00 GMT");
    }
}
