# frozen_string_literal: true

module Microsandbox
  # Turning guest bytes into text for display.
  module Text
    module_function

    # `bytes` as a valid UTF-8 String: every byte sequence that is not UTF-8 becomes
    # U+FFFD (the raw bytes stay available where this is used, e.g. `#stdout_bytes`).
    # @param bytes [String]
    # @return [String] UTF-8, `valid_encoding?` always true
    def lossy_utf8(bytes)
      s = bytes.dup.force_encoding(Encoding::UTF_8)
      s.valid_encoding? ? s : s.scrub("\uFFFD")
    end
  end
end
