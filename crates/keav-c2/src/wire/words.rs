//! Join codes and the words that show them to a person.
//!
//! A [`JoinCode`] is a short random value the C2 server issues for one join request (4 to 16
//! bytes, [`JOIN_CODE_LEN`] by default). The server sends it, signed and addressed to the
//! joining device only, in a human-moderated join response or an observed join response, and
//! to the observer in an observation request. The device then shows it (as words, a QR code,
//! over NFC...), and either the operator's console shows the same words for the request or
//! the observer confirms it saw the code. Because the server chooses the code at random and
//! only the holder of the requesting key receives it, a device that sent a request in another
//! device's place cannot make the physical device show its code (see docs/C2.md).
//!
//! [`join_code_words`] maps each byte to one of 256 words ([`WORDS`], an in-project list of
//! short, common, mutually distinct English nouns), so a 32-bit code reads as four words;
//! [`join_code_from_words`] is its inverse for an operator typing the words back.

use std::fmt;

use rand_core::{OsRng, RngCore};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Default join code length: 4 bytes, shown as 4 words.
pub const JOIN_CODE_LEN: usize = 4;
/// Shortest join code accepted.
pub const MIN_JOIN_CODE_LEN: usize = 4;
/// Longest join code accepted.
pub const MAX_JOIN_CODE_LEN: usize = 16;

/// One word per byte value: `WORDS[b]` shows byte `b`.
pub const WORDS: [&str; 256] = [
    // animals
    "ant", "bear", "bee", "bison", "camel", "cat", "cobra", "cow", "crab", "crow", "deer", "dog",
    "dove", "duck", "eagle", "eel", "elk", "falcon", "fox", "frog", "goat", "goose", "hawk",
    "heron", "horse", "lion", "llama", "lynx", "mole", "moose", "mouse", "mule", "otter", "owl",
    "panda", "parrot", "pig", "puma", "rabbit", "raven", "seal", "shark", "sheep", "snail",
    "snake", "spider", "swan", "tiger", "toad", "trout", "turkey", "viper", "wasp", "whale",
    "wolf", "wombat", "yak", "zebra", "badger", "beaver", // food
    "apple", "bacon", "banana", "bean", "berry", "bread", "butter", "cake", "carrot", "cheese",
    "cherry", "chili", "cocoa", "cookie", "corn", "cream", "curry", "donut", "egg", "fig",
    "garlic", "grape", "honey", "lemon", "lime", "mango", "melon", "mint", "noodle", "olive",
    "onion", "orange", "pasta", "peach", "pear", "pepper", "pizza", "plum", "potato", "rice",
    "salad", "salt", "soup", "sugar", "taco", "tea", "toast", "tomato", "waffle", "yogurt",
    // things
    "anchor", "arrow", "axe", "bag", "ball", "basket", "bell", "bench", "boat", "book", "boot",
    "bottle", "bowl", "box", "brick", "broom", "brush", "bucket", "button", "cable", "camera",
    "candle", "canoe", "cap", "card", "carpet", "chain", "chair", "clock", "coin", "comb", "cup",
    "desk", "drum", "fan", "fence", "flag", "flute", "fork", "glove", "hammer", "hat", "helmet",
    "jar", "kettle", "key", "kite", "ladder", "lamp", "lock", "magnet", "map", "mask", "mirror",
    "nail", "needle", "net", "oven", "paddle", "pan", "pen", "pencil", "piano", "pillow", "pipe",
    "plate", "pot", "radio", "rope", "ruler", "saddle", "scarf", "shovel", "sock", "sofa", "spoon",
    "stamp", "table", "tent", "ticket", "towel", "toy", "truck", "tube", "vase", "wagon", "wallet",
    "wheel", "whistle", "window", // nature
    "acorn", "beach", "canyon", "cave", "cliff", "cloud", "comet", "coral", "desert", "dune",
    "field", "flower", "forest", "glacier", "hill", "island", "jungle", "lake", "leaf", "meadow",
    "moon", "moss", "ocean", "pebble", "planet", "pond", "rain", "river", "rock", "sand", "shell",
    "sky", "snow", "star", "stone", "storm", "sun", "thunder", "tree", "valley", "volcano", "wave",
    "wind", "pine", "oak", "maple", "rose", "tulip", "daisy", "lily", "cactus", "fern", "bamboo",
    "reed", "ivy", "willow",
];

/// The words showing `code`, one per byte.
pub fn join_code_words(code: &[u8]) -> Vec<&'static str> {
    code.iter().map(|&b| WORDS[usize::from(b)]).collect()
}

/// The bytes `words` show (case-insensitive, surrounding blanks ignored), or `None` if a
/// word is not in [`WORDS`].
pub fn join_code_from_words<S: AsRef<str>>(words: &[S]) -> Option<Vec<u8>> {
    words
        .iter()
        .map(|w| {
            let w = w.as_ref().trim().to_ascii_lowercase();
            WORDS
                .iter()
                .position(|x| *x == w)
                .and_then(|i| u8::try_from(i).ok())
        })
        .collect()
}

/// A join code: [`MIN_JOIN_CODE_LEN`] to [`MAX_JOIN_CODE_LEN`] random bytes that gate one
/// join. Kept in zeroizing memory, printed as `JoinCode(..)`, compared in constant time.
#[derive(Clone)]
pub struct JoinCode(Zeroizing<Vec<u8>>);

impl JoinCode {
    /// A fresh random code of `len` bytes (clamped to the accepted range).
    pub fn random(len: usize) -> JoinCode {
        let len = len.clamp(MIN_JOIN_CODE_LEN, MAX_JOIN_CODE_LEN);
        let mut b = Zeroizing::new(vec![0u8; len]);
        OsRng.fill_bytes(&mut b);
        JoinCode(b)
    }

    /// The code of `bytes`, or `None` if its length is outside the accepted range.
    pub fn from_bytes(bytes: &[u8]) -> Option<JoinCode> {
        (MIN_JOIN_CODE_LEN..=MAX_JOIN_CODE_LEN)
            .contains(&bytes.len())
            .then(|| JoinCode(Zeroizing::new(bytes.to_vec())))
    }

    /// The code typed back as words ([`join_code_from_words`]), or `None`.
    pub fn from_words<S: AsRef<str>>(words: &[S]) -> Option<JoinCode> {
        JoinCode::from_bytes(&join_code_from_words(words)?)
    }

    /// The code's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The words that show the code to a person.
    pub fn words(&self) -> Vec<&'static str> {
        join_code_words(&self.0)
    }
}

impl PartialEq for JoinCode {
    fn eq(&self, other: &JoinCode) -> bool {
        // Lengths are public (they are on the wire); the contents are compared in constant time.
        self.0.len() == other.0.len() && bool::from(self.0.ct_eq(&other.0))
    }
}

impl Eq for JoinCode {}

impl fmt::Debug for JoinCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinCode(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn word_list_is_distinct_short_and_lowercase() {
        let set: HashSet<&str> = WORDS.iter().copied().collect();
        assert_eq!(set.len(), 256, "every byte has its own word");
        for w in WORDS {
            assert!((2..=8).contains(&w.len()), "{w}");
            assert!(w.bytes().all(|b| b.is_ascii_lowercase()), "{w}");
        }
    }

    #[test]
    fn words_round_trip_every_byte() {
        let all: Vec<u8> = (0..=255).collect();
        let words = join_code_words(&all);
        assert_eq!(words.len(), 256);
        assert_eq!(join_code_from_words(&words), Some(all));
        assert_eq!(join_code_words(&[0, 255]), vec!["ant", "willow"]);
        assert_eq!(
            join_code_from_words(&[" Ant", "WILLOW "]),
            Some(vec![0, 255])
        );
        assert_eq!(join_code_from_words(&["ant", "unicorn"]), None);
    }

    #[test]
    fn join_codes_compare_and_hide() {
        let c = JoinCode::random(JOIN_CODE_LEN);
        assert_eq!(c.as_bytes().len(), 4);
        assert_eq!(c.words().len(), 4);
        assert_eq!(JoinCode::from_words(&c.words()), Some(c.clone()));
        let mut other = c.as_bytes().to_vec();
        other[3] ^= 1;
        assert_ne!(JoinCode::from_bytes(&other), Some(c.clone()));
        assert_eq!(format!("{c:?}"), "JoinCode(..)");
        assert!(JoinCode::from_bytes(&[1, 2, 3]).is_none());
        assert!(JoinCode::from_bytes(&[0; 17]).is_none());
        assert_eq!(JoinCode::random(100).as_bytes().len(), MAX_JOIN_CODE_LEN);
        assert_ne!(JoinCode::from_bytes(&[1; 4]), JoinCode::from_bytes(&[1; 5]));
    }
}
