//! Proves a request body safe to hand to `kafka-protocol`'s decoders.
//!
//! Those decoders call `Vec::with_capacity(n)` with array counts read from the wire. A
//! 20-byte request that claims 2^31 elements makes the process try to allocate gigabytes, and
//! an allocation failure aborts the process (it is not a panic; nothing can catch it). So before
//! decoding, the broker walks the body against the request's schema, described below as data,
//! and refuses it if any array count exceeds the bytes that follow it (every element takes at
//! least one byte, so such a count can never be valid), or any string, bytes or tagged field
//! runs past the end. The walk allocates nothing from wire values.
//!
//! The guard checks sizes only: whether a null is allowed, or a value is sensible, is left to
//! the decoder and the handlers. The request header needs no guard: it holds no arrays, and its
//! tagged fields are read in a loop without pre-allocation.
//!
//! Only (api key, version) pairs listed in [`SCHEMAS`] are covered; the broker decodes nothing
//! else. A unit test checks every covered version against requests encoded by the crate.
//!
//! References: Kafka protocol guide ("Protocol Primitive Types", message schemas);
//! `kafka-protocol` 0.18 `src/protocol/types.rs` (the `Array`/`CompactArray` decoders).

/// Why a request body was refused before decoding.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GuardError {
    /// No schema covers this API version, so it is never decoded.
    #[error("api key {api_key} version {api_version} is not covered by the request guard")]
    NotCovered {
        /// The request's API key.
        api_key: i16,
        /// The request's version.
        api_version: i16,
    },
    /// An array count cannot fit in the bytes that follow it.
    #[error("array at byte {at} claims {count} elements but only {remaining} bytes follow")]
    ImplausibleCount {
        /// Byte offset of the count in the body.
        at: usize,
        /// The claimed count.
        count: i64,
        /// Bytes after the count.
        remaining: usize,
    },
    /// A length or count is negative where only -1 (null) may be.
    #[error("negative length {length} at byte {at}")]
    NegativeLength {
        /// Byte offset of the length in the body.
        at: usize,
        /// The length read.
        length: i64,
    },
    /// The body ends inside a field.
    #[error("body truncated at byte {at}: {needed} more bytes needed")]
    Truncated {
        /// Where the missing field starts.
        at: usize,
        /// Bytes the field needs beyond the end.
        needed: usize,
    },
    /// An unsigned varint is longer than five bytes.
    #[error("malformed varint at byte {at}")]
    BadVarint {
        /// Byte offset of the varint.
        at: usize,
    },
}

/// The kind of one field.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// A fixed-size value (int8 .. int64, uuid, float64, boolean) of this many bytes.
    Fixed(usize),
    /// A string (int16 length, or compact).
    String,
    /// Bytes or records (int32 length, or compact).
    Bytes,
    /// An array of structs; in flexible versions each element ends with tagged fields.
    Structs(&'static [Field]),
    /// An array of plain values (no per-element tagged fields).
    Values(&'static Kind),
}

/// A field present in versions `since..=until`.
#[derive(Debug, Clone, Copy)]
struct Field {
    kind: Kind,
    since: i16,
    until: i16,
}

const fn all(kind: Kind) -> Field {
    Field {
        kind,
        since: 0,
        until: i16::MAX,
    }
}
const fn since(since: i16, kind: Kind) -> Field {
    Field {
        kind,
        since,
        until: i16::MAX,
    }
}
const fn until(until: i16, kind: Kind) -> Field {
    Field {
        kind,
        since: 0,
        until,
    }
}
const fn between(since: i16, until: i16, kind: Kind) -> Field {
    Field { kind, since, until }
}

const I8: Kind = Kind::Fixed(1);
const BOOL: Kind = Kind::Fixed(1);
const I16: Kind = Kind::Fixed(2);
const I32: Kind = Kind::Fixed(4);
const I64: Kind = Kind::Fixed(8);
const UUID: Kind = Kind::Fixed(16);
const STRING: Kind = Kind::String;
const BYTES: Kind = Kind::Bytes;

/// A covered request: its versions, the first flexible version, and its fields.
#[derive(Debug)]
struct Schema {
    api_key: i16,
    min: i16,
    max: i16,
    flexible_since: i16,
    fields: &'static [Field],
}

/// Every request body the broker decodes. Layouts follow `kafka-protocol` 0.18's decoders.
const SCHEMAS: &[Schema] = &[
    // Produce
    Schema {
        api_key: 0,
        min: 3,
        max: 9,
        flexible_since: 9,
        fields: &[
            all(STRING), // transactional_id
            all(I16),    // acks
            all(I32),    // timeout_ms
            all(Kind::Structs(&[
                all(STRING), // name
                all(Kind::Structs(&[
                    all(I32),   // index
                    all(BYTES), // records
                ])),
            ])),
        ],
    },
    // Fetch
    Schema {
        api_key: 1,
        min: 4,
        max: 12,
        flexible_since: 12,
        fields: &[
            all(I32),      // replica_id
            all(I32),      // max_wait_ms
            all(I32),      // min_bytes
            all(I32),      // max_bytes
            all(I8),       // isolation_level
            since(7, I32), // session_id
            since(7, I32), // session_epoch
            all(Kind::Structs(&[
                all(STRING), // topic
                all(Kind::Structs(&[
                    all(I32),       // partition
                    since(9, I32),  // current_leader_epoch
                    all(I64),       // fetch_offset
                    since(12, I32), // last_fetched_epoch
                    since(5, I64),  // log_start_offset
                    all(I32),       // partition_max_bytes
                ])),
            ])),
            since(
                7,
                Kind::Structs(&[
                    all(STRING),             // topic
                    all(Kind::Values(&I32)), // partitions
                ]),
            ),
            since(11, STRING), // rack_id
        ],
    },
    // ListOffsets
    Schema {
        api_key: 2,
        min: 1,
        max: 10,
        flexible_since: 6,
        fields: &[
            all(I32),     // replica_id
            since(2, I8), // isolation_level
            all(Kind::Structs(&[
                all(STRING), // name
                all(Kind::Structs(&[
                    all(I32),      // partition_index
                    since(4, I32), // current_leader_epoch
                    all(I64),      // timestamp
                ])),
            ])),
            since(10, I32), // timeout_ms
        ],
    },
    // Metadata
    Schema {
        api_key: 3,
        min: 0,
        max: 12,
        flexible_since: 9,
        fields: &[
            all(Kind::Structs(&[
                since(10, UUID), // topic_id
                all(STRING),     // name
            ])),
            since(4, BOOL),       // allow_auto_topic_creation
            between(8, 10, BOOL), // include_cluster_authorized_operations
            since(8, BOOL),       // include_topic_authorized_operations
        ],
    },
    // ApiVersions
    Schema {
        api_key: 18,
        min: 0,
        max: 3,
        flexible_since: 3,
        fields: &[
            since(3, STRING), // client_software_name
            since(3, STRING), // client_software_version
        ],
    },
    // CreateTopics
    Schema {
        api_key: 19,
        min: 2,
        max: 7,
        flexible_since: 5,
        fields: &[
            all(Kind::Structs(&[
                all(STRING), // name
                all(I32),    // num_partitions
                all(I16),    // replication_factor
                all(Kind::Structs(&[
                    all(I32),                // partition_index
                    all(Kind::Values(&I32)), // broker_ids
                ])),
                all(Kind::Structs(&[
                    all(STRING), // name
                    all(STRING), // value
                ])),
            ])),
            all(I32),  // timeout_ms
            all(BOOL), // validate_only
        ],
    },
    // DeleteTopics
    Schema {
        api_key: 20,
        min: 1,
        max: 6,
        flexible_since: 4,
        fields: &[
            since(
                6,
                Kind::Structs(&[
                    all(STRING), // name
                    all(UUID),   // topic_id
                ]),
            ),
            until(5, Kind::Values(&STRING)), // topic_names
            all(I32),                        // timeout_ms
        ],
    },
    // DescribeConfigs
    Schema {
        api_key: 32,
        min: 1,
        max: 4,
        flexible_since: 4,
        fields: &[
            all(Kind::Structs(&[
                all(I8),                    // resource_type
                all(STRING),                // resource_name
                all(Kind::Values(&STRING)), // configuration_keys
            ])),
            all(BOOL),      // include_synonyms
            since(3, BOOL), // include_documentation
        ],
    },
    // AlterConfigs
    Schema {
        api_key: 33,
        min: 0,
        max: 2,
        flexible_since: 2,
        fields: &[
            all(Kind::Structs(&[
                all(I8),     // resource_type
                all(STRING), // resource_name
                all(Kind::Structs(&[
                    all(STRING), // name
                    all(STRING), // value (nullable)
                ])),
            ])),
            all(BOOL), // validate_only
        ],
    },
    // IncrementalAlterConfigs
    Schema {
        api_key: 44,
        min: 0,
        max: 1,
        flexible_since: 1,
        fields: &[
            all(Kind::Structs(&[
                all(I8),     // resource_type
                all(STRING), // resource_name
                all(Kind::Structs(&[
                    all(STRING), // name
                    all(I8),     // config_operation
                    all(STRING), // value (nullable)
                ])),
            ])),
            all(BOOL), // validate_only
        ],
    },
    // InitProducerId
    Schema {
        api_key: 22,
        min: 0,
        max: 4,
        flexible_since: 2,
        fields: &[
            all(STRING),   // transactional_id (nullable)
            all(I32),      // transaction_timeout_ms
            since(3, I64), // producer_id
            since(3, I16), // producer_epoch
        ],
    },
    // AddPartitionsToTxn
    Schema {
        api_key: 24,
        min: 0,
        max: 4,
        flexible_since: 3,
        fields: &[
            since(
                4,
                Kind::Structs(&[
                    all(STRING), // transactional_id
                    all(I64),    // producer_id
                    all(I16),    // producer_epoch
                    all(BOOL),   // verify_only
                    all(Kind::Structs(&[
                        all(STRING),             // name
                        all(Kind::Values(&I32)), // partitions
                    ])),
                ]),
            ),
            until(3, STRING), // v3_and_below_transactional_id
            until(3, I64),    // v3_and_below_producer_id
            until(3, I16),    // v3_and_below_producer_epoch
            until(
                3,
                Kind::Structs(&[
                    all(STRING),             // name
                    all(Kind::Values(&I32)), // partitions
                ]),
            ),
        ],
    },
    // AddOffsetsToTxn
    Schema {
        api_key: 25,
        min: 0,
        max: 4,
        flexible_since: 3,
        fields: &[
            all(STRING), // transactional_id
            all(I64),    // producer_id
            all(I16),    // producer_epoch
            all(STRING), // group_id
        ],
    },
    // EndTxn
    Schema {
        api_key: 26,
        min: 0,
        max: 4,
        flexible_since: 3,
        fields: &[
            all(STRING), // transactional_id
            all(I64),    // producer_id
            all(I16),    // producer_epoch
            all(BOOL),   // committed
        ],
    },
    // TxnOffsetCommit
    Schema {
        api_key: 28,
        min: 0,
        max: 4,
        flexible_since: 3,
        fields: &[
            all(STRING),      // transactional_id
            all(STRING),      // group_id
            all(I64),         // producer_id
            all(I16),         // producer_epoch
            since(3, I32),    // generation_id
            since(3, STRING), // member_id
            since(3, STRING), // group_instance_id (nullable)
            all(Kind::Structs(&[
                all(STRING), // name
                all(Kind::Structs(&[
                    all(I32),      // partition_index
                    all(I64),      // committed_offset
                    since(2, I32), // committed_leader_epoch
                    all(STRING),   // committed_metadata (nullable)
                ])),
            ])),
        ],
    },
    // DescribeTransactions
    Schema {
        api_key: 65,
        min: 0,
        max: 0,
        flexible_since: 0,
        fields: &[
            all(Kind::Values(&STRING)), // transactional_ids
        ],
    },
    // ListTransactions
    Schema {
        api_key: 66,
        min: 0,
        max: 1,
        flexible_since: 0,
        fields: &[
            all(Kind::Values(&STRING)), // state_filters
            all(Kind::Values(&I64)),    // producer_id_filters
            since(1, I64),              // duration_filter
        ],
    },
    // DescribeProducers
    Schema {
        api_key: 61,
        min: 0,
        max: 0,
        flexible_since: 0,
        fields: &[all(Kind::Structs(&[
            all(STRING),             // name
            all(Kind::Values(&I32)), // partition_indexes
        ]))],
    },
    // DeleteRecords
    Schema {
        api_key: 21,
        min: 0,
        max: 2,
        flexible_since: 2,
        fields: &[
            all(Kind::Structs(&[
                all(STRING), // name
                all(Kind::Structs(&[
                    all(I32), // partition_index
                    all(I64), // offset
                ])),
            ])),
            all(I32), // timeout_ms
        ],
    },
    // SaslHandshake
    Schema {
        api_key: 17,
        min: 0,
        max: 1,
        flexible_since: i16::MAX,
        fields: &[all(STRING)], // mechanism
    },
    // SaslAuthenticate
    Schema {
        api_key: 36,
        min: 0,
        max: 2,
        flexible_since: 2,
        fields: &[all(BYTES)], // auth_bytes
    },
    // DescribeLogDirs
    Schema {
        api_key: 35,
        min: 1,
        max: 4,
        flexible_since: 2,
        fields: &[all(Kind::Structs(&[
            all(STRING),             // topic
            all(Kind::Values(&I32)), // partitions
        ]))],
    },
    // CreatePartitions
    Schema {
        api_key: 37,
        min: 0,
        max: 3,
        flexible_since: 2,
        fields: &[
            all(Kind::Structs(&[
                all(STRING), // name
                all(I32),    // count
                all(Kind::Structs(&[
                    all(Kind::Values(&I32)), // broker_ids
                ])),
            ])),
            all(I32),  // timeout_ms
            all(BOOL), // validate_only
        ],
    },
    // FindCoordinator
    Schema {
        api_key: 10,
        min: 0,
        max: 4,
        flexible_since: 3,
        fields: &[
            until(3, STRING),                // key
            since(1, I8),                    // key_type
            since(4, Kind::Values(&STRING)), // coordinator_keys
        ],
    },
    // JoinGroup
    Schema {
        api_key: 11,
        min: 0,
        max: 9,
        flexible_since: 6,
        fields: &[
            all(STRING),      // group_id
            all(I32),         // session_timeout_ms
            since(1, I32),    // rebalance_timeout_ms
            all(STRING),      // member_id
            since(5, STRING), // group_instance_id
            all(STRING),      // protocol_type
            all(Kind::Structs(&[
                all(STRING), // name
                all(BYTES),  // metadata
            ])),
            since(8, STRING), // reason
        ],
    },
    // SyncGroup
    Schema {
        api_key: 14,
        min: 0,
        max: 5,
        flexible_since: 4,
        fields: &[
            all(STRING),      // group_id
            all(I32),         // generation_id
            all(STRING),      // member_id
            since(3, STRING), // group_instance_id
            since(5, STRING), // protocol_type
            since(5, STRING), // protocol_name
            all(Kind::Structs(&[
                all(STRING), // member_id
                all(BYTES),  // assignment
            ])),
        ],
    },
    // Heartbeat
    Schema {
        api_key: 12,
        min: 0,
        max: 4,
        flexible_since: 4,
        fields: &[
            all(STRING),      // group_id
            all(I32),         // generation_id
            all(STRING),      // member_id
            since(3, STRING), // group_instance_id
        ],
    },
    // LeaveGroup
    Schema {
        api_key: 13,
        min: 0,
        max: 5,
        flexible_since: 4,
        fields: &[
            all(STRING),      // group_id
            until(2, STRING), // member_id
            since(
                3,
                Kind::Structs(&[
                    all(STRING),      // member_id
                    all(STRING),      // group_instance_id
                    since(5, STRING), // reason
                ]),
            ),
        ],
    },
    // OffsetCommit
    Schema {
        api_key: 8,
        min: 2,
        max: 8,
        flexible_since: 8,
        fields: &[
            all(STRING),      // group_id
            all(I32),         // generation_id_or_member_epoch
            all(STRING),      // member_id
            since(7, STRING), // group_instance_id
            until(4, I64),    // retention_time_ms
            all(Kind::Structs(&[
                all(STRING), // name
                all(Kind::Structs(&[
                    all(I32),      // partition_index
                    all(I64),      // committed_offset
                    since(6, I32), // committed_leader_epoch
                    all(STRING),   // committed_metadata
                ])),
            ])),
        ],
    },
    // OffsetFetch
    Schema {
        api_key: 9,
        min: 1,
        max: 8,
        flexible_since: 6,
        fields: &[
            until(7, STRING), // group_id
            until(
                7,
                Kind::Structs(&[
                    all(STRING),             // name
                    all(Kind::Values(&I32)), // partition_indexes
                ]),
            ),
            since(
                8,
                Kind::Structs(&[
                    all(STRING), // group_id
                    all(Kind::Structs(&[
                        all(STRING),             // name
                        all(Kind::Values(&I32)), // partition_indexes
                    ])),
                ]),
            ),
            since(7, BOOL), // require_stable
        ],
    },
    // ListGroups
    Schema {
        api_key: 16,
        min: 0,
        max: 4,
        flexible_since: 3,
        fields: &[since(4, Kind::Values(&STRING))], // states_filter
    },
    // DescribeGroups
    Schema {
        api_key: 15,
        min: 0,
        max: 5,
        flexible_since: 5,
        fields: &[
            all(Kind::Values(&STRING)), // groups
            since(3, BOOL),             // include_authorized_operations
        ],
    },
    // DeleteGroups
    Schema {
        api_key: 42,
        min: 0,
        max: 2,
        flexible_since: 2,
        fields: &[all(Kind::Values(&STRING))], // groups_names
    },
    // OffsetDelete
    Schema {
        api_key: 47,
        min: 0,
        max: 0,
        flexible_since: i16::MAX,
        fields: &[
            all(STRING), // group_id
            all(Kind::Structs(&[
                all(STRING), // name
                all(Kind::Structs(&[
                    all(I32), // partition_index
                ])),
            ])),
        ],
    },
];

fn schema(api_key: i16, api_version: i16) -> Option<&'static Schema> {
    SCHEMAS
        .iter()
        .find(|s| s.api_key == api_key && (s.min..=s.max).contains(&api_version))
}

/// Every (api key, version) the guard covers.
pub(crate) fn covered_versions() -> Vec<(i16, i16)> {
    SCHEMAS
        .iter()
        .flat_map(|s| (s.min..=s.max).map(move |v| (s.api_key, v)))
        .collect()
}

/// Whether the guard covers (and so the broker may decode) this API version.
pub fn is_covered(api_key: i16, api_version: i16) -> bool {
    schema(api_key, api_version).is_some()
}

/// What the walk learned about a body it accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    /// Array elements and tagged fields in the body, nested ones included. Each becomes a
    /// value of its own once decoded (and usually one in the answer too), so this, not the
    /// byte count, is what the request costs in memory: an empty string is one byte on the
    /// wire and a few hundred once decoded and answered.
    pub elements: u64,
}

/// Checks that every length and count in `body` fits in the bytes that follow it, and counts
/// the values it will decode into.
///
/// # Errors
/// [`GuardError`] describing the first field that cannot be valid, or `NotCovered`.
pub fn check_request_body(
    api_key: i16,
    api_version: i16,
    body: &[u8],
) -> Result<Checked, GuardError> {
    let schema = schema(api_key, api_version).ok_or(GuardError::NotCovered {
        api_key,
        api_version,
    })?;
    let mut walker = Walker {
        body,
        at: 0,
        version: api_version,
        flexible: api_version >= schema.flexible_since,
        elements: 0,
    };
    walker.fields(schema.fields)?;
    Ok(Checked {
        elements: walker.elements,
    })
}

struct Walker<'a> {
    body: &'a [u8],
    at: usize,
    version: i16,
    flexible: bool,
    elements: u64,
}

impl Walker<'_> {
    fn remaining(&self) -> usize {
        self.body.len() - self.at
    }

    fn take(&mut self, bytes: usize) -> Result<&[u8], GuardError> {
        if bytes > self.remaining() {
            return Err(GuardError::Truncated {
                at: self.at,
                needed: bytes - self.remaining(),
            });
        }
        let start = self.at;
        self.at += bytes;
        Ok(&self.body[start..self.at])
    }

    fn unsigned_varint(&mut self) -> Result<u32, GuardError> {
        let start = self.at;
        let mut value: u32 = 0;
        for i in 0..5 {
            let byte = self.take(1)?[0];
            value |= u32::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(GuardError::BadVarint { at: start })
    }

    /// A length prefix: compact (varint, 0 = null) in flexible versions, else `int16`/`int32`.
    /// Returns `None` for null.
    fn length(&mut self, classic_bytes: usize) -> Result<Option<usize>, GuardError> {
        let at = self.at;
        let length = if self.flexible {
            i64::from(self.unsigned_varint()?) - 1
        } else if classic_bytes == 2 {
            let b = self.take(2)?;
            i64::from(i16::from_be_bytes([b[0], b[1]]))
        } else {
            let b = self.take(4)?;
            i64::from(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        match length {
            -1 => Ok(None),
            l if l < 0 => Err(GuardError::NegativeLength { at, length: l }),
            l => usize::try_from(l)
                .map(Some)
                .map_err(|_| GuardError::NegativeLength { at, length: l }),
        }
    }

    fn count(&mut self) -> Result<Option<usize>, GuardError> {
        let at = self.at;
        let Some(count) = self.length(4)? else {
            return Ok(None);
        };
        if count > self.remaining() {
            return Err(GuardError::ImplausibleCount {
                at,
                count: count as i64,
                remaining: self.remaining(),
            });
        }
        self.elements += count as u64;
        Ok(Some(count))
    }

    fn fields(&mut self, fields: &[Field]) -> Result<(), GuardError> {
        for field in fields {
            if (field.since..=field.until).contains(&self.version) {
                self.kind(&field.kind)?;
            }
        }
        if self.flexible {
            self.tagged_fields()?;
        }
        Ok(())
    }

    fn kind(&mut self, kind: &Kind) -> Result<(), GuardError> {
        match kind {
            Kind::Fixed(size) => {
                self.take(*size)?;
            }
            Kind::String => {
                if let Some(length) = self.length(2)? {
                    self.take(length)?;
                }
            }
            Kind::Bytes => {
                if let Some(length) = self.length(4)? {
                    self.take(length)?;
                }
            }
            Kind::Structs(fields) => {
                for _ in 0..self.count()?.unwrap_or(0) {
                    self.fields(fields)?;
                }
            }
            Kind::Values(element) => {
                for _ in 0..self.count()?.unwrap_or(0) {
                    self.kind(element)?;
                }
            }
        }
        Ok(())
    }

    fn tagged_fields(&mut self) -> Result<(), GuardError> {
        let at = self.at;
        let count = usize::try_from(self.unsigned_varint()?).unwrap_or(usize::MAX);
        if count > self.remaining() {
            return Err(GuardError::ImplausibleCount {
                at,
                count: count as i64,
                remaining: self.remaining(),
            });
        }
        self.elements += count as u64;
        for _ in 0..count {
            self.unsigned_varint()?;
            let size = usize::try_from(self.unsigned_varint()?).unwrap_or(usize::MAX);
            self.take(size)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
