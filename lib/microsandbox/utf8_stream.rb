# frozen_string_literal: true

module Microsandbox
  # Decodes one output stream (a command's stdout or stderr) chunk by chunk as UTF-8.
  #
  # The guest writes bytes, not characters, so a character may arrive split across
  # chunks. {#feed} returns the text of everything complete so far and keeps the first
  # bytes of a character that is still incomplete (at most 3) for the next chunk, so
  # "caf\xC3" then "\xA9\n" decode to "caf" then "é\n". Bytes that can never become valid
  # UTF-8 are U+FFFD. The result is always valid UTF-8. A character still incomplete when
  # the stream ends is in no chunk's text (the raw bytes keep it). Pure Ruby, no I/O.
  class Utf8Stream
    # For each lead byte, [sequence length, allowed range of the second byte] (RFC 3629).
    LEADS = (0xC2..0xF4).to_h do |b|
      len = b >= 0xF0 ? 4 : (b >= 0xE0 ? 3 : 2)
      second = { 0xE0 => 0xA0..0xBF, 0xED => 0x80..0x9F, 0xF0 => 0x90..0xBF, 0xF4 => 0x80..0x8F }
               .fetch(b, 0x80..0xBF)
      [b, [len, second]]
    end.freeze
    private_constant :LEADS

    def initialize
      @pending = "".b
    end

    # @param bytes [String] the next chunk (any encoding; its bytes are used)
    # @return [String] UTF-8 text of the complete characters so far
    def feed(bytes)
      buf = @pending + bytes.b
      held = incomplete_tail(buf)
      @pending = buf.byteslice(buf.bytesize - held, held)
      buf.byteslice(0, buf.bytesize - held).force_encoding(Encoding::UTF_8).scrub("\uFFFD")
    end

    # @return [String] U+FFFD for a character left incomplete at the end of the stream,
    #   else ""; the stream is empty afterwards
    def finish
      text = @pending.empty? ? "" : "\uFFFD"
      @pending = "".b
      text
    end

    private

    # How many bytes at the end of `buf` start a valid character that needs more bytes.
    def incomplete_tail(buf)
      size = buf.bytesize
      (1..[3, size].min).each do |k|
        lead = buf.getbyte(size - k)
        next if lead.between?(0x80, 0xBF) # a continuation byte: look further back

        len, second = LEADS[lead]
        return 0 unless len && len > k
        return 0 if k >= 2 && !second.cover?(buf.getbyte(size - k + 1))
        return 0 unless (2...k).all? { |i| buf.getbyte(size - k + i).between?(0x80, 0xBF) }

        return k
      end
      0
    end
  end
end
