//! Test helpers shared by every section's unit tests: a small valid file, and parsing from a fixed path.

use std::path::Path;

use crate::error::Error;
use crate::model::Config;

/// The smallest complete file: one site, one route, one upstream.
pub(crate) const EXAMPLE: &str = r#"
names = ["localhost"]

[listen]
https = ["127.0.0.1:8443"]
http  = ["127.0.0.1:8080"]

[tls]
cert = "/etc/portcullis/fullchain.pem"
key  = "/etc/portcullis/privkey.pem"

[[route]]
path = "/"
upstream = "app"

[upstream.app]
servers = ["127.0.0.1:8000"]
"#;

pub(crate) fn parse(text: &str) -> Result<Config, Error> {
    Config::parse(Path::new("/etc/portcullis/portcullis.toml"), text)
}

/// Every problem as it is printed, or none when the text is valid.
pub(crate) fn problems(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(_) => Vec::new(),
        Err(Error::Invalid { problems }) => problems.iter().map(ToString::to_string).collect(),
        Err(e) => vec![e.to_string()],
    }
}
