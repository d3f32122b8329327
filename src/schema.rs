//! The diesel schema of `migrations/` (what `diesel print-schema` would write).

diesel::table! {
    items (id) {
        id -> Int8,
        name -> Text,
        description -> Text,
        price_cents -> Int8,
        version -> Int8,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}
