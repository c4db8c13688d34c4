//! Short Authentication String rendering (RFC 6189 §5.1.6, §7).
//!
//! The SAS is taken from `sashash = KDF(s0, "SAS", KDF_Context, 256)`
//! ([`crate::crypto::SessionKeys::sashash`]): `sasvalue` is its leftmost 32 bits, of which
//! B32 renders the leftmost 20 and B256 the leftmost 16.

/// The SAS rendering negotiated in Commit (RFC 6189 §5.1.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SasType {
    /// `"B32 "`: four characters of the RFC's base32 alphabet.
    B32,
    /// `"B256"`: two words of the PGP word list.
    B256,
}

impl SasType {
    /// Renders the SAS of `sashash` in this type.
    pub fn render(&self, sashash: &[u8; 32]) -> String {
        match self {
            SasType::B32 => render_b32(sashash),
            SasType::B256 => render_b256(sashash),
        }
    }

    /// The type for a SAS type block (`b"B32 "`, `b"B256"`), or `None` if unknown.
    pub fn from_algo(id: &[u8; 4]) -> Option<SasType> {
        match id {
            b"B32 " => Some(SasType::B32),
            b"B256" => Some(SasType::B256),
            _ => None,
        }
    }

    /// The SAS type block of this type.
    pub fn algo_id(&self) -> [u8; 4] {
        match self {
            SasType::B32 => *b"B32 ",
            SasType::B256 => *b"B256",
        }
    }
}

/// `sasvalue`: the leftmost 32 bits of `sashash`, big-endian (RFC 6189 §4.5.2).
pub fn sas_value(sashash: &[u8; 32]) -> u32 {
    u32::from_be_bytes([sashash[0], sashash[1], sashash[2], sashash[3]])
}

/// The base32 alphabet of RFC 6189 §5.1.6 (not RFC 4648's).
const B32_ALPHABET: &[u8; 32] = b"ybndrfg8ejkmcpqxot1uwisza345h769";

/// B32 rendering (RFC 6189 §5.1.6): the leftmost 20 bits of `sasvalue` as four base32
/// characters, most significant quintet first.
pub fn render_b32(sashash: &[u8; 32]) -> String {
    let v = sas_value(sashash);
    (0..4)
        .map(|i| {
            let n = ((v >> (27 - 5 * i)) & 31) as usize;
            char::from(B32_ALPHABET[n])
        })
        .collect()
}

/// The two PGP words of B256: the even-list (two-syllable) word for the first byte of
/// `sasvalue` and the odd-list (three-syllable) word for the second.
pub fn b256_words(sashash: &[u8; 32]) -> [&'static str; 2] {
    [
        PGP_EVEN[usize::from(sashash[0])],
        PGP_ODD[usize::from(sashash[1])],
    ]
}

/// B256 rendering (RFC 6189 §5.1.6): the leftmost 16 bits of `sasvalue` in network byte order
/// through the PGP word list, as `"even odd"` (one space). Linphone's bzrtp joins the same
/// two words with `':'` instead; compare [`b256_words`] when matching its display.
pub fn render_b256(sashash: &[u8; 32]) -> String {
    let [even, odd] = b256_words(sashash);
    format!("{even} {odd}")
}

/// PGP word list, even positions (two syllables), indexed by byte value.
const PGP_EVEN: [&str; 256] = [
    "aardvark",
    "absurd",
    "accrue",
    "acme",
    "adrift",
    "adult",
    "afflict",
    "ahead", // 0x00
    "aimless",
    "Algol",
    "allow",
    "alone",
    "ammo",
    "ancient",
    "apple",
    "artist", // 0x08
    "assume",
    "Athens",
    "atlas",
    "Aztec",
    "baboon",
    "backfield",
    "backward",
    "banjo", // 0x10
    "beaming",
    "bedlamp",
    "beehive",
    "beeswax",
    "befriend",
    "Belfast",
    "berserk",
    "billiard", // 0x18
    "bison",
    "blackjack",
    "blockade",
    "blowtorch",
    "bluebird",
    "bombast",
    "bookshelf",
    "brackish", // 0x20
    "breadline",
    "breakup",
    "brickyard",
    "briefcase",
    "Burbank",
    "button",
    "buzzard",
    "cement", // 0x28
    "chairlift",
    "chatter",
    "checkup",
    "chisel",
    "choking",
    "chopper",
    "Christmas",
    "clamshell", // 0x30
    "classic",
    "classroom",
    "cleanup",
    "clockwork",
    "cobra",
    "commence",
    "concert",
    "cowbell", // 0x38
    "crackdown",
    "cranky",
    "crowfoot",
    "crucial",
    "crumpled",
    "crusade",
    "cubic",
    "dashboard", // 0x40
    "deadbolt",
    "deckhand",
    "dogsled",
    "dragnet",
    "drainage",
    "dreadful",
    "drifter",
    "dropper", // 0x48
    "drumbeat",
    "drunken",
    "Dupont",
    "dwelling",
    "eating",
    "edict",
    "egghead",
    "eightball", // 0x50
    "endorse",
    "endow",
    "enlist",
    "erase",
    "escape",
    "exceed",
    "eyeglass",
    "eyetooth", // 0x58
    "facial",
    "fallout",
    "flagpole",
    "flatfoot",
    "flytrap",
    "fracture",
    "framework",
    "freedom", // 0x60
    "frighten",
    "gazelle",
    "Geiger",
    "glitter",
    "glucose",
    "goggles",
    "goldfish",
    "gremlin", // 0x68
    "guidance",
    "hamlet",
    "highchair",
    "hockey",
    "indoors",
    "indulge",
    "inverse",
    "involve", // 0x70
    "island",
    "jawbone",
    "keyboard",
    "kickoff",
    "kiwi",
    "klaxon",
    "locale",
    "lockup", // 0x78
    "merit",
    "minnow",
    "miser",
    "Mohawk",
    "mural",
    "music",
    "necklace",
    "Neptune", // 0x80
    "newborn",
    "nightbird",
    "Oakland",
    "obtuse",
    "offload",
    "optic",
    "orca",
    "payday", // 0x88
    "peachy",
    "pheasant",
    "physique",
    "playhouse",
    "Pluto",
    "preclude",
    "prefer",
    "preshrunk", // 0x90
    "printer",
    "prowler",
    "pupil",
    "puppy",
    "python",
    "quadrant",
    "quiver",
    "quota", // 0x98
    "ragtime",
    "ratchet",
    "rebirth",
    "reform",
    "regain",
    "reindeer",
    "rematch",
    "repay", // 0xa0
    "retouch",
    "revenge",
    "reward",
    "rhythm",
    "ribcage",
    "ringbolt",
    "robust",
    "rocker", // 0xa8
    "ruffled",
    "sailboat",
    "sawdust",
    "scallion",
    "scenic",
    "scorecard",
    "Scotland",
    "seabird", // 0xb0
    "select",
    "sentence",
    "shadow",
    "shamrock",
    "showgirl",
    "skullcap",
    "skydive",
    "slingshot", // 0xb8
    "slowdown",
    "snapline",
    "snapshot",
    "snowcap",
    "snowslide",
    "solo",
    "southward",
    "soybean", // 0xc0
    "spaniel",
    "spearhead",
    "spellbind",
    "spheroid",
    "spigot",
    "spindle",
    "spyglass",
    "stagehand", // 0xc8
    "stagnate",
    "stairway",
    "standard",
    "stapler",
    "steamship",
    "sterling",
    "stockman",
    "stopwatch", // 0xd0
    "stormy",
    "sugar",
    "surmount",
    "suspense",
    "sweatband",
    "swelter",
    "tactics",
    "talon", // 0xd8
    "tapeworm",
    "tempest",
    "tiger",
    "tissue",
    "tonic",
    "topmost",
    "tracker",
    "transit", // 0xe0
    "trauma",
    "treadmill",
    "Trojan",
    "trouble",
    "tumor",
    "tunnel",
    "tycoon",
    "uncut", // 0xe8
    "unearth",
    "unwind",
    "uproot",
    "upset",
    "upshot",
    "vapor",
    "village",
    "virus", // 0xf0
    "Vulcan",
    "waffle",
    "wallet",
    "watchword",
    "wayside",
    "willow",
    "woodlark",
    "Zulu", // 0xf8
];

/// PGP word list, odd positions (three syllables), indexed by byte value.
const PGP_ODD: [&str; 256] = [
    "adroitness",
    "adviser",
    "aftermath",
    "aggregate",
    "alkali",
    "almighty",
    "amulet",
    "amusement", // 0x00
    "antenna",
    "applicant",
    "Apollo",
    "armistice",
    "article",
    "asteroid",
    "Atlantic",
    "atmosphere", // 0x08
    "autopsy",
    "Babylon",
    "backwater",
    "barbecue",
    "belowground",
    "bifocals",
    "bodyguard",
    "bookseller", // 0x10
    "borderline",
    "bottomless",
    "Bradbury",
    "bravado",
    "Brazilian",
    "breakaway",
    "Burlington",
    "businessman", // 0x18
    "butterfat",
    "Camelot",
    "candidate",
    "cannonball",
    "Capricorn",
    "caravan",
    "caretaker",
    "celebrate", // 0x20
    "cellulose",
    "certify",
    "chambermaid",
    "Cherokee",
    "Chicago",
    "clergyman",
    "coherence",
    "combustion", // 0x28
    "commando",
    "company",
    "component",
    "concurrent",
    "confidence",
    "conformist",
    "congregate",
    "consensus", // 0x30
    "consulting",
    "corporate",
    "corrosion",
    "councilman",
    "crossover",
    "crucifix",
    "cumbersome",
    "customer", // 0x38
    "Dakota",
    "decadence",
    "December",
    "decimal",
    "designing",
    "detector",
    "detergent",
    "determine", // 0x40
    "dictator",
    "dinosaur",
    "direction",
    "disable",
    "disbelief",
    "disruptive",
    "distortion",
    "document", // 0x48
    "embezzle",
    "enchanting",
    "enrollment",
    "enterprise",
    "equation",
    "equipment",
    "escapade",
    "Eskimo", // 0x50
    "everyday",
    "examine",
    "existence",
    "exodus",
    "fascinate",
    "filament",
    "finicky",
    "forever", // 0x58
    "fortitude",
    "frequency",
    "gadgetry",
    "Galveston",
    "getaway",
    "glossary",
    "gossamer",
    "graduate", // 0x60
    "gravity",
    "guitarist",
    "hamburger",
    "Hamilton",
    "handiwork",
    "hazardous",
    "headwaters",
    "hemisphere", // 0x68
    "hesitate",
    "hideaway",
    "holiness",
    "hurricane",
    "hydraulic",
    "impartial",
    "impetus",
    "inception", // 0x70
    "indigo",
    "inertia",
    "infancy",
    "inferno",
    "informant",
    "insincere",
    "insurgent",
    "integrate", // 0x78
    "intention",
    "inventive",
    "Istanbul",
    "Jamaica",
    "Jupiter",
    "leprosy",
    "letterhead",
    "liberty", // 0x80
    "maritime",
    "matchmaker",
    "maverick",
    "Medusa",
    "megaton",
    "microscope",
    "microwave",
    "midsummer", // 0x88
    "millionaire",
    "miracle",
    "misnomer",
    "molasses",
    "molecule",
    "Montana",
    "monument",
    "mosquito", // 0x90
    "narrative",
    "nebula",
    "newsletter",
    "Norwegian",
    "October",
    "Ohio",
    "onlooker",
    "opulent", // 0x98
    "Orlando",
    "outfielder",
    "Pacific",
    "pandemic",
    "Pandora",
    "paperweight",
    "paragon",
    "paragraph", // 0xa0
    "paramount",
    "passenger",
    "pedigree",
    "Pegasus",
    "penetrate",
    "perceptive",
    "performance",
    "pharmacy", // 0xa8
    "phonetic",
    "photograph",
    "pioneer",
    "pocketful",
    "politeness",
    "positive",
    "potato",
    "processor", // 0xb0
    "provincial",
    "proximate",
    "puberty",
    "publisher",
    "pyramid",
    "quantity",
    "racketeer",
    "rebellion", // 0xb8
    "recipe",
    "recover",
    "repellent",
    "replica",
    "reproduce",
    "resistor",
    "responsive",
    "retraction", // 0xc0
    "retrieval",
    "retrospect",
    "revenue",
    "revival",
    "revolver",
    "sandalwood",
    "sardonic",
    "Saturday", // 0xc8
    "savagery",
    "scavenger",
    "sensation",
    "sociable",
    "souvenir",
    "specialist",
    "speculate",
    "stethoscope", // 0xd0
    "stupendous",
    "supportive",
    "surrender",
    "suspicious",
    "sympathy",
    "tambourine",
    "telephone",
    "therapist", // 0xd8
    "tobacco",
    "tolerance",
    "tomorrow",
    "torpedo",
    "tradition",
    "travesty",
    "trombonist",
    "truncated", // 0xe0
    "typewriter",
    "ultimate",
    "undaunted",
    "underfoot",
    "unicorn",
    "unify",
    "universe",
    "unravel", // 0xe8
    "upcoming",
    "vacancy",
    "vagabond",
    "vertigo",
    "Virginia",
    "visitor",
    "vocalist",
    "voyager", // 0xf0
    "warranty",
    "Waterloo",
    "whimsical",
    "Wichita",
    "Wilmington",
    "Wyoming",
    "yesteryear",
    "Yucatan", // 0xf8
];

#[cfg(test)]
mod tests {
    use super::*;

    fn hash_with(prefix: u32) -> [u8; 32] {
        let mut h = [0xEEu8; 32];
        h[..4].copy_from_slice(&prefix.to_be_bytes());
        h
    }

    #[test]
    fn sas_value_is_leftmost_32_bits() {
        assert_eq!(sas_value(&hash_with(0xd269_b071)), 0xd269_b071);
    }

    #[test]
    fn b32_known_values() {
        // Hand-computed with the RFC 6189 §5.1.6 pseudocode and alphabet.
        assert_eq!(render_b32(&hash_with(0)), "yyyy");
        assert_eq!(render_b32(&hash_with(0xffff_ffff)), "9999");
        assert_eq!(render_b32(&hash_with(0x1234_5678)), "ne4f");
        assert_eq!(render_b32(&hash_with(0x8000_0000)), "oyyy");
        // Only the leftmost 20 bits count.
        assert_eq!(render_b32(&hash_with(0x0000_0fff)), "yyyy");
        assert_eq!(render_b32(&hash_with(0x0000_1000)), "yyyb");
        // sashash of bzrtp's KDF pattern ("SAS" label): d269b071...
        assert_eq!(render_b32(&hash_with(0xd269_b071)), "4jw5");
        assert_eq!(SasType::B32.render(&hash_with(0x1234_5678)), "ne4f");
    }

    #[test]
    fn b256_known_values() {
        assert_eq!(render_b256(&hash_with(0)), "aardvark adroitness");
        assert_eq!(render_b256(&hash_with(0xffff_0000)), "Zulu Yucatan");
        assert_eq!(render_b256(&hash_with(0xd269_b071)), "standard guitarist");
        assert_eq!(b256_words(&hash_with(0x1234_0000)), ["atlas", "confidence"]);
        // Only the leftmost 16 bits count.
        assert_eq!(render_b256(&hash_with(0x0000_ffff)), "aardvark adroitness");
        assert_eq!(SasType::B256.render(&hash_with(0)), "aardvark adroitness");
    }

    #[test]
    fn pgp_word_list_spot_checks() {
        // Entries of the published list (independent of the source this table came from).
        let even = [
            (0x09, "Algol"),
            (0x11, "Athens"),
            (0x33, "chisel"),
            (0x56, "egghead"),
            (0x63, "flatfoot"),
            (0x88, "newborn"),
            (0x9D, "quadrant"),
            (0xD8, "stormy"),
            (0xDC, "sweatband"),
            (0xE3, "tissue"),
        ];
        let odd = [
            (0x02, "aftermath"),
            (0x0D, "asteroid"),
            (0x41, "decadence"),
            (0x56, "escapade"),
            (0x5B, "exodus"),
            (0x74, "hydraulic"),
            (0xC0, "recipe"),
            (0xC5, "resistor"),
            (0xF9, "Waterloo"),
        ];
        for (b, w) in even {
            assert_eq!(PGP_EVEN[b], w, "even {b:#x}");
        }
        for (b, w) in odd {
            assert_eq!(PGP_ODD[b], w, "odd {b:#x}");
        }
    }

    #[test]
    fn pgp_word_lists_are_disjoint_and_unique() {
        let mut all: Vec<String> = PGP_EVEN
            .iter()
            .chain(PGP_ODD.iter())
            .map(|w| w.to_lowercase())
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 512);
    }

    #[test]
    fn algo_ids_round_trip() {
        for t in [SasType::B32, SasType::B256] {
            assert_eq!(SasType::from_algo(&t.algo_id()), Some(t));
        }
        assert_eq!(SasType::from_algo(b"B32 "), Some(SasType::B32));
        assert_eq!(SasType::from_algo(b"B256"), Some(SasType::B256));
        assert_eq!(SasType::from_algo(b"B32\0"), None);
        assert_eq!(SasType::from_algo(b"b256"), None);
    }
}
