//! Hashes of words and n-grams, shared by the quality filter's repetition
//! rules and MinHash deduplication.

/// One 64-bit hash of an n-gram from the hashes of its words.
pub fn ngram_hash(words: &[u64]) -> u64 {
    let mixed = words.iter().fold(0x9e37_79b9_7f4a_7c15u64, |h, &w| (h.rotate_left(23) ^ w).wrapping_mul(0xff51_afd7_ed55_8ccd));
    fmix64(mixed)
}

/// MurmurHash3's 64-bit finalizer: every input bit affects every output bit.
pub fn fmix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}
