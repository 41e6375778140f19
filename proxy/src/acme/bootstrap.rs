//! The certificate an ACME site serves from the first handshake on, before its task has ordered anything:
//! the stored one, else the configured `cert`/`key` files, else a self-signed one. `reload::load` calls it at
//! start; a bad choice is logged and the next one tried.

use std::path::PathBuf;

use portcullis_certs::Loaded;
use portcullis_certs::acme::Store;
use portcullis_config::Config;

/// The certificate an ACME site serves at start: the stored one when it is usable, else the configured
/// `files`, else a self-signed one for its names. Only the last can fail (and then start fails).
pub fn bootstrap(
    config: &Config,
    site: usize,
    names: &[String],
    files: Option<&(PathBuf, PathBuf)>,
) -> Result<Loaded, portcullis_certs::Error> {
    if let Some(settings) = &config.acme {
        let store = Store::new(settings).site(names);
        match store.load() {
            Ok(Some(loaded)) => {
                tracing::info!(site, names = ?names, "serving the stored ACME certificate");
                return Ok(loaded);
            }
            Ok(None) => {}
            Err(e) => {
                // Stored for fewer names (one was added): it still serves those until the new one arrives.
                if let Ok(loaded) =
                    portcullis_certs::load_checked(&store.cert_path(), &store.key_path(), &[])
                {
                    tracing::warn!(
                        site,
                        "serving the stored ACME certificate until a new one is ordered: {e}"
                    );
                    return Ok(loaded);
                }
                tracing::warn!(
                    site,
                    "stored ACME certificate not served, a new one will be ordered: {e}"
                );
            }
        }
    }
    if let Some((cert, key)) = files {
        match portcullis_certs::load_checked(cert, key, names) {
            Ok(loaded) => {
                tracing::info!(
                    site,
                    "serving the configured cert/key files until the first ACME certificate"
                );
                return Ok(loaded);
            }
            Err(e) => tracing::warn!(site, "configured cert/key not served: {e}"),
        }
    }
    let loaded = portcullis_certs::self_signed_loaded(names)?;
    tracing::info!(site, names = ?names, "serving a self-signed certificate until the first ACME certificate");
    Ok(loaded)
}
