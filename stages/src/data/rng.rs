//! The one seeded generator (SplitMix64, Steele et al. 2014) and the one
//! shuffle. Fixed here rather than taken from a crate, so data orders and
//! samples never change with a dependency's version.

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64: tiny, seedable, statistically sound; the same draws on every
/// platform.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The generator of stream `stream` of `seed` (an epoch, a prompt): its
    /// start is hashed from both, so neighbouring streams are unrelated.
    pub fn stream(seed: u64, stream: u64) -> Rng {
        Rng(mix(seed ^ mix(stream)).wrapping_add(GOLDEN))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        finalize(self.0)
    }

    /// Uniform in [0, 1), 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (n > 0): multiply-shift maps 64 random bits onto the
    /// range with negligible bias, where `% n` would favour small values.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Fisher–Yates: every order equally likely.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// `0..n` in an order that depends only on `seed`.
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    Rng::new(seed).shuffle(&mut order);
    order
}

/// SplitMix64's output of `x`: a 64-bit hash in which every input bit
/// affects every output bit.
pub fn mix(x: u64) -> u64 {
    finalize(x.wrapping_add(GOLDEN))
}

fn finalize(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_splitmix64() {
        // The first outputs for seed 1234567 of the C reference (Vigna).
        let mut rng = Rng::new(1234567);
        assert_eq!([rng.next_u64(), rng.next_u64(), rng.next_u64()], [6457827717110365317, 3203168211198807973, 9817491932198370423]);
    }

    #[test]
    fn shuffles_are_permutations_without_bias() {
        let order = shuffled(1000, 7);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_eq!(order, shuffled(1000, 7), "a function of the seed");
        // Each of 3 positions takes each of 3 values about a third of the time.
        let mut counts = [[0u32; 3]; 3];
        for seed in 0..30_000 {
            for (pos, &v) in shuffled(3, seed).iter().enumerate() {
                counts[pos][v] += 1;
            }
        }
        assert!(counts.iter().flatten().all(|&c| (9_500..10_500).contains(&c)), "{counts:?}");
    }
}
