use sha2::{Digest, Sha256};

const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// A random id with a type prefix, e.g. `dbx_3k9...` (20 base-36 chars, ~103 bits).
pub fn new_id(prefix: &str) -> String {
    let mut raw = [0u8; 20];
    getrandom::fill(&mut raw).expect("OS randomness");
    let mut s = String::with_capacity(prefix.len() + 21);
    s.push_str(prefix);
    s.push('_');
    for b in raw {
        s.push(ALPHABET[(b % 36) as usize] as char);
    }
    s
}

/// Each API key is its own tenant. The tenant id is derived from the key so it survives
/// restarts and reordering of `--api-key` flags, without storing the key itself.
pub fn tenant_of_key(key: &str) -> String {
    let h = Sha256::digest(key.as_bytes());
    let hex: String = h.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("tnt_{hex}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_prefixed_and_distinct() {
        let a = super::new_id("dbx");
        assert!(a.starts_with("dbx_") && a.len() == 24);
        assert_ne!(a, super::new_id("dbx"));
        assert_eq!(super::tenant_of_key("k"), super::tenant_of_key("k"));
        assert_ne!(super::tenant_of_key("k"), super::tenant_of_key("k2"));
    }
}
