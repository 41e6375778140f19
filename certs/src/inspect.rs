//! What a certificate chain says, read with x509-parser: the leaf's names, issuer, validity and key type,
//! whether the chain is in order, and whether its names cover a site's names. Used to refuse a bad pair
//! before it is served, and by `portcullis check`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The facts about a chain that an operator wants to see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub subject: String,
    pub issuer: String,
    /// DNS names and IP addresses from subjectAltName (lower-case).
    pub names: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub key_type: String,
    pub serial: String,
    /// Each certificate is issued by the next one.
    pub chain_in_order: bool,
    pub chain_len: usize,
}

impl Info {
    pub fn read(chain: &[CertificateDer<'_>]) -> Result<Info, String> {
        let parsed: Vec<X509Certificate<'_>> = chain
            .iter()
            .map(|c| {
                X509Certificate::from_der(c.as_ref())
                    .map(|(_, x)| x)
                    .map_err(|e| format!("unparsable certificate: {e}"))
            })
            .collect::<Result<_, _>>()?;
        let leaf = parsed.first().ok_or("empty chain")?;
        let mut names = Vec::new();
        if let Ok(Some(san)) = leaf.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    GeneralName::DNSName(d) => names.push(d.to_ascii_lowercase()),
                    GeneralName::IPAddress(b) => {
                        if let Ok(a) = <[u8; 4]>::try_from(*b) {
                            names.push(std::net::IpAddr::from(a).to_string());
                        } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                            names.push(std::net::IpAddr::from(a).to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
        let chain_in_order = parsed.windows(2).all(|w| w[0].issuer() == w[1].subject());
        let key_type = match leaf.public_key().parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => format!("RSA {}", rsa.key_size()),
            Ok(x509_parser::public_key::PublicKey::EC(ec)) => {
                format!("ECDSA {}", curve_name(ec.key_size()))
            }
            Ok(other) => format!("{other:?}")
                .split('(')
                .next()
                .unwrap_or("other")
                .to_owned(),
            Err(_) => "unknown".to_owned(),
        };
        Ok(Info {
            subject: leaf.subject().to_string(),
            issuer: leaf.issuer().to_string(),
            names,
            not_before: to_system(leaf.validity().not_before.timestamp()),
            not_after: to_system(leaf.validity().not_after.timestamp()),
            key_type,
            serial: leaf.raw_serial_as_string(),
            chain_in_order,
            chain_len: parsed.len(),
        })
    }

    /// The site names the certificate does not cover (RFC 6125: `*.x` covers one label).
    pub fn uncovered<'a>(&self, site_names: &'a [String]) -> Vec<&'a str> {
        site_names
            .iter()
            .filter(|want| !self.names.iter().any(|have| covers(have, want)))
            .map(String::as_str)
            .collect()
    }

    pub fn expired(&self, now: SystemTime) -> bool {
        now > self.not_after
    }

    /// Time left until expiry (zero when expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }
}

fn covers(have: &str, want: &str) -> bool {
    if have.eq_ignore_ascii_case(want) {
        return true;
    }
    match (have.strip_prefix("*."), want.split_once('.')) {
        (Some(suffix), Some((label, rest))) => {
            !label.is_empty() && label != "*" && rest.eq_ignore_ascii_case(suffix)
        }
        _ => false,
    }
}

fn curve_name(bits: usize) -> &'static str {
    match bits {
        256 => "P-256",
        384 => "P-384",
        521 => "P-521",
        _ => "curve",
    }
}

fn to_system(ts: i64) -> SystemTime {
    if ts >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(ts.unsigned_abs())
    }
}

/// A date as `YYYY-MM-DD HH:MM:SS UTC` (civil-from-days, Howard Hinnant's algorithm).
pub fn format_time(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_cover() {
        assert!(covers("*.example.com", "a.example.com"));
        assert!(!covers("*.example.com", "example.com"));
        assert!(!covers("*.example.com", "a.b.example.com"));
        assert!(covers("app.test", "APP.test"));
    }

    #[test]
    fn reads_a_generated_certificate() {
        let c =
            rcgen::generate_simple_self_signed(vec!["a.test".into(), "127.0.0.1".into()]).unwrap();
        let info = Info::read(&[c.cert.der().clone()]).unwrap();
        assert_eq!(info.names, ["a.test", "127.0.0.1"]);
        assert_eq!(info.key_type, "ECDSA P-256");
        assert!(info.chain_in_order);
        assert!(!info.expired(SystemTime::now()));
        assert_eq!(
            info.uncovered(&["a.test".into(), "b.test".into()]),
            ["b.test"]
        );
        assert_eq!(
            format_time(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            "2023-11-14 22:13:20 UTC"
        );
    }
}
