# frozen_string_literal: true

require "base64"
require "json"
require "time"

module Microsandbox
  class CLI
    # Formatting shared by the commands: JSON documents, aligned tables, sizes and times.
    # Everything the CLI prints about guest output keeps the exact bytes reachable: text
    # fields are valid UTF-8 and a `*_base64` field carries the bytes when they are not.
    module Output
      private

      # One JSON document on stdout, one line.
      def emit_json(value)
        @out.puts JSON.generate(value)
      end

      # `{"stdout" => text}` plus `"stdout_base64"` when the bytes are not valid UTF-8,
      # so a script can always recover the exact bytes.
      def bytes_fields(key, bytes)
        bytes = bytes.b
        utf8 = bytes.dup.force_encoding(Encoding::UTF_8)
        fields = { key => Text.lossy_utf8(bytes) }
        fields["#{key}_base64"] = Base64.strict_encode64(bytes) unless utf8.valid_encoding?
        fields
      end

      # Left-aligned columns, two spaces apart; `rows` are Arrays of Strings.
      def table(headers, rows)
        widths = headers.each_index.map { |i| ([headers] + rows).map { |r| r[i].to_s.length }.max }
        ([headers] + rows).each do |row|
          @out.puts row.each_with_index.map { |cell, i| i == row.size - 1 ? cell.to_s : cell.to_s.ljust(widths[i]) }
                       .join("  ")
        end
      end

      def human_bytes(bytes)
        units = %w[B KiB MiB GiB TiB]
        value = bytes.to_f
        unit = 0
        while value >= 1024 && unit < units.size - 1
          value /= 1024
          unit += 1
        end
        unit.zero? ? "#{bytes} B" : format("%.1f %s", value, units[unit])
      end

      def iso_time(time)
        time&.utc&.iso8601
      end

      def local_time(time)
        time ? time.localtime.strftime("%Y-%m-%d %H:%M:%S") : "-"
      end
    end
  end
end
